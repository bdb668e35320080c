"""Erases one concept from the toy model under several settings and measures each: the trade-off table.

    python scripts/sweep_toy.py --concept red --out runs/sweep-red \
        --set learning_rate=1e-4,3e-4 --set iterations=100,200 --set method=esd-x,esd-u

    python scripts/sweep_toy.py --concept red --out runs/fast-red --eval-seeds 0,1,2 \
        --set seed=0,1,2 --set trajectories=0,32      # the fast mode against the recipe, with the noise of both

Every combination of the --set values (any EraseConfig key, on top of configs/toy.py with the concept
replaced) is one erase run in OUT/<name>, evaluated against the base model on the same noise, once per
evaluation seed (image i of every prompt starts from the noise of (seed, i)). The base model's
measurements are kept in OUT/base-<seed>.json and finished runs are skipped, so further invocations on
the same OUT (other --set axes, other --prompts) add rows to one table. Writes OUT/results.jsonl (one
record per run: its erase wall time, its UNet evaluations counted, and its report at every evaluation
seed), OUT/table.md (concept rate against the other values' accuracy, a row per run, averaged over the
evaluation seeds, with their range) and OUT/tradeoff.png (the same as a scatter plot). With `seed` among
the --set axes, table.md also averages each setting over its erase seeds, and OUT/cost.png plots the
concept rate of each setting against its erase time.
"""

import argparse
import dataclasses
import itertools
import json
import sys
import textwrap
import time
from pathlib import Path

from esd_jax.config import EraseConfig, EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.esd import caches_in
from esd_jax.files import atomic_file
from esd_jax.metrics import MetricsLog
from esd_jax.pipeline import load_pipeline
from esd_jax.run import apply_delta
from esd_jax.sampling.sampler import Sampler
from esd_jax.toy import evaluate as ev
from esd_jax.train import erase
from esd_jax.trajectories import padded_count

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.py"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True, help="the world concept measured (a colour, shape or style)")
    parser.add_argument("--prompts", help="the erase prompt(s), '|'-separated (default: the concept)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="values to sweep")
    parser.add_argument("--num-per-prompt", type=int, default=16)
    parser.add_argument("--eval-seeds", default="0", help="evaluation seeds, comma-separated (default: 0)")
    args = parser.parse_args()
    try:
        args.eval_seeds = [int(v) for v in args.eval_seeds.split(",")]
    except ValueError:
        parser.error(f"--eval-seeds {args.eval_seeds!r}: give integers, comma-separated, e.g. 0,1,2")
    return args


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
    """The base model's measurement, from OUT/base-<seed>.json when taken with the same concept and settings."""
    key = {"concept": concept.value, "settings": dataclasses.asdict(settings)}
    path = out / f"base-{settings.seed}.json"
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


def unet_calls(cfg: EraseConfig, workdir: Path) -> dict[str, int]:
    """The run's UNet evaluations, one image each, counted from its settings and the k of every step
    (metrics.jsonl): `frozen` forwards (sampling x_t and the target's predictions), `trained` forward
    and backward passes.

    The recipe's sampling loop runs to the largest k of each device's batch, two predictions (unguided
    and guided) per sample and step, then the target's two (three with erase_from) at step k; the fast
    mode samples its cache once, or once per `refresh_every` iterations, with as many predictions per
    step and trajectory (its count padded to the device count). Retain prompts double the rows: every
    device's erase pairs and as many retain pairs, all in metrics.jsonl's k, and as many trajectories.
    """
    rows = MetricsLog.read_rows(workdir / "metrics.jsonl")
    contexts = 3 if cfg.erase_from else 2
    b = cfg.batch_per_device * cfg.rows_per_erase_pair
    devices = len(rows[0]["k"]) // b
    trained = sum(len(r["k"]) for r in rows)
    if cfg.trajectories:
        padded = padded_count(cfg.trajectories, devices) * cfg.rows_per_erase_pair
        caches = caches_in(cfg.iterations, cfg.refresh_every)
        return {"frozen": caches * padded * cfg.ddim_steps * contexts, "trained": trained}
    frozen = 0
    for r in rows:
        for d in range(devices):
            frozen += b * (2 * max(r["k"][d * b : (d + 1) * b]) + contexts)
    return {"frozen": frozen, "trained": trained}


def averaged(reports: list[dict]):
    """The reports' numbers averaged, their other values (names, settings) taken from the first."""
    first = reports[0]
    if isinstance(first, dict):
        return {k: averaged([r[k] for r in reports]) for k in first}
    if isinstance(first, float | int) and not isinstance(first, bool):
        return sum(reports) / len(reports)
    return first


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


def rate_range(row: dict) -> str:
    """The concept rate over the evaluation seeds: their mean, with their range when there are several."""
    rates = [r["concept_rate_erased"] for r in row["reports"].values()]
    mean = sum(rates) / len(rates)
    return f"{mean:.2f}" if len(rates) == 1 else f"{mean:.2f} ({min(rates):.2f}-{max(rates):.2f})"


def worst_prompt(row: dict) -> str:
    """The prompt naming the concept that keeps it most often (its rate over every evaluation seed)."""
    rates: dict[str, list[float]] = {}
    for report in row["reports"].values():
        for text, p in report["prompts"].items():
            if p["group"] == "concept":
                rates.setdefault(text, []).append(p["erased"]["concept_rate"])
    text, values = max(rates.items(), key=lambda item: sum(item[1]))
    return f"{sum(values) / len(values):.2f} ({text})"


def table(rows: list[dict], concept: str) -> str:
    attribute = rows[0]["attribute"]
    other = "shape" if attribute == "colour" else "colour"  # the other attribute the concept's prompts name
    seeds = len(rows[0]["reports"])
    head = (
        f"| settings | {concept} rate, its prompts{' (range over evaluation seeds)' if seeds > 1 else ''} | "
        f"worst prompt | {attribute} accuracy, other prompts (kept) | {other} accuracy, {concept} prompts | "
        f"{concept} rate, unnamed prompts | erase wall time | frozen UNet evaluations | trained (fwd+bwd) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]
    cells = ["base model"]
    cells += [f"{base['concept_rate_base']:.2f}", "", f"{base['others_accuracy_base']:.2f}"]
    cells += [f"{base['groups']['concept']['base']['accuracy'].get(other, float('nan')):.2f}"]
    cells += [f"{base['groups']['unnamed']['base']['concept_rate']:.2f}", "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        kept = r["others_accuracy_erased"] / r["others_accuracy_base"]
        cells = [
            r["name"].replace("|", "\\|"),
            rate_range(r),
            worst_prompt(r),
            f"{r['others_accuracy_erased']:.2f} ({kept:.0%})",
        ]
        cells += [f"{r['groups']['concept']['erased']['accuracy'].get(other, float('nan')):.2f}"]
        cells += [f"{r['groups']['unnamed']['erased']['concept_rate']:.2f}"]
        cells += [f"{r['erase_seconds']:.0f} s", f"{r['unet_calls']['frozen']:,}", f"{r['unet_calls']['trained']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def over_erase_seeds(rows: list[dict]) -> list[dict]:
    """One row per setting apart from the erase seed: every run's evaluations pooled, times averaged."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        rest = {k: v for k, v in r["overrides"].items() if k != "seed"}
        groups.setdefault(name_of(rest, None) + "|" + r["erase_prompts"], []).append(r)
    pooled = []
    for runs in groups.values():
        reports = [rep for r in runs for rep in r["reports"].values()]
        rest = {k: v for k, v in runs[0]["overrides"].items() if k != "seed"}
        pooled.append(
            {
                **averaged(reports),
                "name": name_of(rest, None) + f" ({len(runs)} erase seeds)",
                "overrides": rest,
                "erase_prompts": runs[0]["erase_prompts"],
                "reports": {str(i): rep for i, rep in enumerate(reports)},
                "erase_seconds": averaged([r["erase_seconds"] for r in runs]),
                "unet_calls": {k: round(v) for k, v in averaged([r["unet_calls"] for r in runs]).items()},
            }
        )
    return pooled


def short_label(row: dict) -> str:
    """A point's name in cost.png: the recipe or T trajectories, then its other overrides."""
    rest = {k: v for k, v in row["overrides"].items() if k != "trajectories"}
    t = row["overrides"].get("trajectories", 0)
    head = f"T = {t}" if t else "recipe"
    return ", ".join([head] + ([label({**row, "overrides": rest})] if rest else []))


def plot_cost(rows: list[dict], concept: str, out: Path) -> None:
    """Each setting's concept rate (mean, and range over every erase and evaluation seed) against its
    frozen UNet evaluations and its erase wall time, the other values' accuracy kept beside each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    for ax, key, title in (
        (axes[0], lambda r: r["unet_calls"]["frozen"], "frozen UNet evaluations, one image each (log scale)"),
        (axes[1], lambda r: r["erase_seconds"], "erase wall time, seconds (log scale; 2-core CPU)"),
    ):
        for n, r in enumerate(sorted(rows, key=key)):
            rates = [rep["concept_rate_erased"] for rep in r["reports"].values()]
            mean = sum(rates) / len(rates)
            cached = r["overrides"].get("trajectories", 0) > 0
            colour = "tab:blue" if cached else "tab:red"
            x = key(r)
            ax.errorbar(x, mean, yerr=[[mean - min(rates)], [max(rates) - mean]], fmt="o", color=colour, capsize=3)
            kept = r["others_accuracy_erased"] / r["others_accuracy_base"]
            offset = (6, 10 if n % 2 else -16)  # alternate sides, so that neighbouring labels do not overlap
            text = f"{short_label(r)}: {mean:.2f}, {kept:.0%} kept"
            ax.annotate(text, (x, mean), xytext=offset, textcoords="offset points", fontsize=7, color=colour)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.3)
    axes[0].set_ylabel(f"rate of {concept} on prompts naming it")
    axes[0].plot([], [], "o", color="tab:red", label="per-iteration recipe")
    axes[0].plot([], [], "o", color="tab:blue", label="fast mode, T cached trajectories")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"erasing {concept!r} from the toy model: mean over erase and evaluation seeds, bars their range; "
        "lower left is better",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    args = parse_args()
    concept = ev.parse_concept(args.concept)
    base_config = {**toy_config(), "concept": args.prompts or concept.value}
    settings = [
        ev.toy_settings(EvaluateConfig(num_per_prompt=args.num_per_prompt, seed=seed)) for seed in args.eval_seeds
    ]
    prompts = ev.prompts_for(concept)
    pipe = load_pipeline(base_config["model"])
    ev.check_vocabulary(pipe, prompts)
    first = settings[0]
    sampler = Sampler(pipe, steps=first.steps, guidance=first.guidance, batch_size=first.batch_size)
    base = {s.seed: base_measurement(args.out, concept, s, sampler, prompts) for s in settings}

    results = args.out / "results.jsonl"
    done = {}
    if results.exists():
        done = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
        if any(sorted(map(int, r["reports"])) != sorted(args.eval_seeds) for r in done.values()):
            raise UserError(f"{results} holds runs measured at other evaluation seeds; use another --out")
        if any(r["num_per_prompt"] != args.num_per_prompt for r in done.values()):
            raise UserError(f"{results} holds runs measured with other settings; use another --out")
    for overrides in combinations(args.set):
        name = name_of(overrides, args.prompts)
        if name not in done:
            cfg = EraseConfig(**{**base_config, **overrides, "workdir": str(args.out / name)})
            cfg.validate()
            began = time.perf_counter()
            delta = erase(cfg)
            seconds = time.perf_counter() - began
            erased = load_pipeline(cfg.model)
            apply_delta(erased, delta)
            sampler.set_unet(erased.unet)
            reports = {}
            for s in settings:
                measured = ev.measure(concept, prompts, ev.sample_prompts(sampler, prompts, s))
                reports[str(s.seed)] = ev.report(concept, prompts, s, {"base": base[s.seed], "erased": measured})
            done[name] = {
                **averaged(list(reports.values())),
                "name": name,
                "overrides": overrides,
                "erase_prompts": cfg.concept,
                "num_per_prompt": args.num_per_prompt,
                "erase_seconds": seconds,
                "unet_calls": unet_calls(cfg, Path(cfg.workdir)),
                "reports": reports,
            }
            with open(results, "a") as f:
                f.write(json.dumps(done[name]) + "\n")
            others = done[name]["others_accuracy_erased"]
            print(f"{name}: {concept.value} rate {rate_range(done[name])}, others {others:.2f}")
    rows = list(done.values())
    text = table(rows, concept.value)
    if any("seed" in r["overrides"] for r in rows):
        pooled = over_erase_seeds(rows)
        text += "\nAveraged over erase seeds (the range: over every erase and evaluation seed):\n\n"
        text += table(pooled, concept.value)
        plot_cost(pooled, concept.value, args.out / "cost.png")
    with atomic_file(args.out / "table.md") as tmp:
        tmp.write_text(text)
    plot(rows, concept.value, args.out / "tradeoff.png")
    print(text)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
