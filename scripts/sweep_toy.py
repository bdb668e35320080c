"""Erases one concept from the toy model under several settings and measures each: the trade-off table.

    python scripts/sweep_toy.py --concept red --out runs/sweep-red \
        --set learning_rate=1e-4,3e-4 --set iterations=100,200 --set method=esd-x,esd-u

Every combination of the --set values (any EraseConfig key, on top of configs/toy.py with the concept
replaced) is one erase run in OUT/<name>, evaluated against the base model on the same noise. A rerun
skips finished runs. Writes OUT/results.jsonl (one report per run), OUT/table.md (concept rate against
the other values' accuracy, a row per run) and OUT/tradeoff.png (the same as a scatter plot).
"""

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

from esd_jax.config import EraseConfig
from esd_jax.errors import UserError
from esd_jax.export import apply_delta
from esd_jax.files import atomic_file
from esd_jax.pipeline import load_pipeline
from esd_jax.sampling import Sampler
from esd_jax.toy import evaluate as ev
from esd_jax.train import erase

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.py"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True, help="the world concept measured (a colour, shape or style)")
    parser.add_argument("--prompts", help="the erase prompt(s), '|'-separated (default: the concept)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="values to sweep")
    parser.add_argument("--num-per-prompt", type=int, default=16)
    return parser.parse_args()


def toy_config() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().to_dict()


def combinations(sets: list[str]) -> list[dict]:
    types = {f.name: type(f.default) for f in dataclasses.fields(EraseConfig)}
    axes = []
    for item in sets:
        key, _, values = item.partition("=")
        if key not in types or not values:
            raise UserError(f"--set {item!r}: give KEY=V1,V2 with KEY one of {', '.join(types)}")
        axes.append([(key, types[key](v)) for v in values.split(",")])
    return [dict(c) for c in itertools.product(*axes)]


def name_of(overrides: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def plot(rows: list[dict], concept: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.scatter([r["others_accuracy_erased"] for r in rows], [r["concept_rate_erased"] for r in rows])
    for r in rows:
        ax.annotate(r["name"], (r["others_accuracy_erased"], r["concept_rate_erased"]), fontsize=6)
    base = rows[0]
    ax.scatter([base["others_accuracy_base"]], [base["concept_rate_base"]], marker="*", s=150, c="k", label="base")
    ax.set_xlabel(f"accuracy on the other {base['attribute']}s' prompts")
    ax.set_ylabel(f"rate of {concept} on prompts naming it")
    ax.set_title(f"erasing {concept!r} from the toy model: lower right is better", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def table(rows: list[dict], concept: str) -> str:
    attribute = rows[0]["attribute"]
    other = "shape" if attribute == "colour" else "colour"  # the other attribute the concept's prompts name
    head = (
        f"| settings | {concept} rate, its prompts | {attribute} accuracy, other prompts | "
        f"{other} accuracy, {concept} prompts | {concept} rate, unnamed prompts |"
    )
    lines = [head, "|---|---|---|---|---|"]
    base = rows[0]
    cells = ["base model"]
    cells += [f"{base['concept_rate_base']:.2f}", f"{base['others_accuracy_base']:.2f}"]
    cells += [f"{base['groups']['concept']['base']['accuracy'].get(other, float('nan')):.2f}"]
    cells += [f"{base['groups']['unnamed']['base']['concept_rate']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["name"], f"{r['concept_rate_erased']:.2f}", f"{r['others_accuracy_erased']:.2f}"]
        cells += [f"{r['groups']['concept']['erased']['accuracy'].get(other, float('nan')):.2f}"]
        cells += [f"{r['groups']['unnamed']['erased']['concept_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    concept = ev.parse_concept(args.concept)
    base_config = {**toy_config(), "concept": args.prompts or concept.value}
    settings = ev.Settings(num_per_prompt=args.num_per_prompt)
    prompts = ev.prompts_for(concept)
    pipe = load_pipeline(base_config["model"])
    ev.check_vocabulary(pipe, prompts)
    sampler = Sampler(pipe, steps=settings.steps, guidance=settings.guidance, batch_size=settings.batch_size)
    base = ev.measure(concept, prompts, ev.generate(sampler, prompts, settings))

    results = args.out / "results.jsonl"
    done = {}
    if results.exists():
        done = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
    rows = []
    for overrides in combinations(args.set):
        name = name_of(overrides)
        if name not in done:
            cfg = EraseConfig(**{**base_config, **overrides, "workdir": str(args.out / name)})
            cfg.validate()
            delta = erase(cfg)
            erased = load_pipeline(cfg.model)
            apply_delta(erased, delta)
            sampler.set_unet(erased.unet)
            measured = ev.measure(concept, prompts, ev.generate(sampler, prompts, settings))
            report = ev.report(concept, prompts, settings, {"base": base, "erased": measured})
            done[name] = {"name": name, "overrides": overrides, **report}
            with open(results, "a") as f:
                f.write(json.dumps(done[name]) + "\n")
            print(
                f"{name}: {concept.value} rate {report['concept_rate_erased']:.2f}, "
                f"others {report['others_accuracy_erased']:.2f}"
            )
        rows.append(done[name])
    with atomic_file(args.out / "table.md") as tmp:
        tmp.write_text(table(rows, concept.value))
    plot(rows, concept.value, args.out / "tradeoff.png")
    print(table(rows, concept.value))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
