"""Erases one concept from the toy model under several settings and measures each: the trade-off table.

    python scripts/sweep_toy.py --concept red --out runs/sweep-red \
        --set learning_rate=1e-4,3e-4 --set iterations=100,200 --set method=esd-x,esd-u

Every combination of the --set values (any EraseConfig key, on top of configs/toy.py with the concept
replaced) is one erase run in OUT/<name>, evaluated against the base model on the same noise. The base
model's measurement is kept in OUT/base.json and finished runs are skipped, so further invocations on the
same OUT (other --set axes, other --prompts) add rows to one table. Writes OUT/results.jsonl (one report
per run), OUT/table.md (concept rate against the other values' accuracy, a row per run in OUT) and
OUT/tradeoff.png (the same as a scatter plot).
"""

import argparse
import dataclasses
import itertools
import json
import sys
import textwrap
from pathlib import Path

from esd_jax.config import EraseConfig, EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.files import atomic_file
from esd_jax.pipeline import load_pipeline
from esd_jax.run import apply_delta
from esd_jax.sampling.sampler import Sampler
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


def name_of(overrides: dict, prompts: str | None) -> str:
    """The run's folder name: its overrides, and its erase prompts when they are not the concept alone."""
    items = [*overrides.items()] + ([("prompts", prompts.replace("|", "+").replace(" ", "-"))] if prompts else [])
    return "_".join(f"{k}={v}" for k, v in items) or "default"


def base_measurement(out: Path, concept: ev.Concept, settings: EvaluateConfig, sampler: Sampler, prompts) -> dict:
    """The base model's measurement, from OUT/base.json when it was taken with the same concept and settings."""
    key = {"concept": concept.value, "settings": dataclasses.asdict(settings)}
    path = out / "base.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if {k: saved[k] for k in key} == key:
            return saved["measured"]
        raise UserError(f"{out} holds a sweep of {saved['concept']!r} with other settings; use another --out")
    measured = ev.measure(concept, prompts, ev.sample_prompts(sampler, prompts, settings))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({**key, "measured": measured}) + "\n")
    return measured


def label(row: dict) -> str:
    """A short legend entry for a run: its overrides, and its erase prompts when they are not the concept alone."""
    short = {"learning_rate": "lr", "negative_guidance": "eta", "iterations": "iterations"}
    parts = [
        f"{short.get(k, k)} {v:g}" if isinstance(v, float) else f"{short.get(k, k)} {v}"
        for k, v in row["overrides"].items()
    ]
    prompts = row["erase_prompts"].split("|")
    if prompts != [row["concept"]]:
        parts.append(f"erase prompt{'s' if len(prompts) > 1 else ''} " + " | ".join(prompts))
    return ", ".join(parts) or "configs/toy.py"


def plot(rows: list[dict], concept: str, out: Path) -> None:
    """Concept rate against the share of the other values' accuracy kept, one numbered point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5), dpi=120)
    kept = [100 * r["others_accuracy_erased"] / r["others_accuracy_base"] for r in rows]
    rate = [r["concept_rate_erased"] for r in rows]
    ax.scatter(kept, rate, s=40, zorder=3)
    for i, (x, y) in enumerate(zip(kept, rate, strict=True), 1):
        ax.annotate(str(i), (x, y), xytext=(5, 3), textcoords="offset points", fontsize=9)
    ax.scatter([100], [rows[0]["concept_rate_base"]], marker="*", s=200, c="k", label="base model", zorder=3)
    if rows[0]["attribute"] == "colour":
        ax.axhline(0.1, ls="--", c="grey", lw=1)
        ax.axvline(90, ls="--", c="grey", lw=1, label="the target for a colour: rate <= 0.1, 90% kept")
    ax.set_xlabel(f"other {rows[0]['attribute']}s' accuracy kept (% of the base model's)")
    ax.set_ylabel(f"rate of {concept} on prompts naming it")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"erasing {concept!r} from the toy model: lower right is better", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    entries = [textwrap.wrap(label(r), 48, subsequent_indent="    ") for r in rows]
    legend = "\n".join(f"{i:<3d} " + "\n".join(lines) for i, lines in enumerate(entries, 1))
    fig.text(0.62, 0.5, legend, fontsize=8, va="center", family="monospace")
    fig.subplots_adjust(left=0.07, right=0.6, bottom=0.12)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def table(rows: list[dict], concept: str) -> str:
    attribute = rows[0]["attribute"]
    other = "shape" if attribute == "colour" else "colour"  # the other attribute the concept's prompts name
    head = (
        f"| settings | {concept} rate, its prompts | {attribute} accuracy, other prompts (kept) | "
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
        kept = r["others_accuracy_erased"] / r["others_accuracy_base"]
        cells = [r["name"], f"{r['concept_rate_erased']:.2f}", f"{r['others_accuracy_erased']:.2f} ({kept:.0%})"]
        cells += [f"{r['groups']['concept']['erased']['accuracy'].get(other, float('nan')):.2f}"]
        cells += [f"{r['groups']['unnamed']['erased']['concept_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    concept = ev.parse_concept(args.concept)
    base_config = {**toy_config(), "concept": args.prompts or concept.value}
    settings = EvaluateConfig(num_per_prompt=args.num_per_prompt)
    prompts = ev.prompts_for(concept)
    pipe = load_pipeline(base_config["model"])
    ev.check_vocabulary(pipe, prompts)
    sampler = Sampler(pipe, steps=settings.steps, guidance=settings.guidance, batch_size=settings.batch_size)
    base = base_measurement(args.out, concept, settings, sampler, prompts)

    results = args.out / "results.jsonl"
    done = {}
    if results.exists():
        done = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
        if any(r["settings"] != dataclasses.asdict(settings) for r in done.values()):
            raise UserError(f"{results} holds runs measured with other settings; use another --out")
    for overrides in combinations(args.set):
        name = name_of(overrides, args.prompts)
        if name not in done:
            cfg = EraseConfig(**{**base_config, **overrides, "workdir": str(args.out / name)})
            cfg.validate()
            delta = erase(cfg)
            erased = load_pipeline(cfg.model)
            apply_delta(erased, delta)
            sampler.set_unet(erased.unet)
            measured = ev.measure(concept, prompts, ev.sample_prompts(sampler, prompts, settings))
            report = ev.report(concept, prompts, settings, {"base": base, "erased": measured})
            done[name] = {"name": name, "overrides": overrides, "erase_prompts": cfg.concept, **report}
            with open(results, "a") as f:
                f.write(json.dumps(done[name]) + "\n")
            print(
                f"{name}: {concept.value} rate {report['concept_rate_erased']:.2f}, "
                f"others {report['others_accuracy_erased']:.2f}"
            )
    rows = list(done.values())
    with atomic_file(args.out / "table.md") as tmp:
        tmp.write_text(table(rows, concept.value))
    plot(rows, concept.value, args.out / "tradeoff.png")
    print(table(rows, concept.value))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
