"""`esd-jax evaluate --prompts CSV --judge ...`: the images of a prompt CSV, base and erased, judged.

One flow for every real-model judge: sample the CSV's prompts once per model with the resumable
sampler (the same seeds for both, `esd-jax sample --compare`'s folders), or take folders made elsewhere
(`--images`, `--base_images`: `<case_number>_<i>.png`, as the official scripts name them), then let each
judge read every image. Each judge is a class with `name`, `judge(images, rows) -> records` (one
JSON-able record per image) and `summary(records, rows) -> dict`, and may have `check_rows(rows)`, which
refuses a CSV it cannot judge before anything is sampled; the report holds every judge's summary
per folder and goes to the terminal as a table and to a JSON file, with NudeNet's chart beside it. A judge
named in PAIRWISE_JUDGES (LPIPS, FID) measures the erased folder against the base one instead:
`compare(base_images, erased_images, rows) -> (summary, records)`, records one per erased image or none
(a measure of the two sets as wholes), its summary the report's "erased" column.
"""

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from esd_jax.config import PAIRWISE_JUDGES, EvaluateConfig, SampleConfig
from esd_jax.errors import UserError
from esd_jax.files import atomic_file
from esd_jax.sampling.prompts import PromptRow, read_prompts_csv

# Where each judge lives: imported only when asked for, so that erasing and sampling need none of their
# dependencies (the [eval] extra).
JUDGES = {
    "nudenet": "esd_jax.judges.nudenet:NudeNetJudge",
    "classifier": "esd_jax.judges.classifier:ClassifierJudge",
    "clip": "esd_jax.judges.clip:CLIPJudge",
    "toy": "esd_jax.toy.judge:ToyJudge",
    "lpips": "esd_jax.judges.lpips:LPIPSJudge",
    "fid": "esd_jax.judges.fid:FIDJudge",
}
MADE_BY = "esd-jax evaluate --prompts"


def make_judge(name: str, cfg: EvaluateConfig):
    module, cls = JUDGES[name].split(":")
    judge_cls = getattr(importlib.import_module(module), cls)
    settings = {
        "nudenet": lambda: dict(threshold=cfg.threshold),
        "classifier": lambda: dict(model=cfg.classifier, concept=cfg.concept),
        "clip": lambda: dict(model=cfg.clip_model, concept=cfg.concept),
        "toy": lambda: dict(concept=cfg.concept),
        "lpips": lambda: dict(size=cfg.lpips_size),
        "fid": lambda: dict(features=cfg.fid_features),
    }[name]()  # an attack's settings hold only the judges it can use
    return judge_cls(**settings)


def image_rows(rows: list[PromptRow], per_prompt: int) -> list[dict[str, Any]]:
    """What a judge knows of each image: its CSV row (prompt, seed, case_number and the other columns)."""
    return [
        {**row.columns, "prompt": row.prompt, "evaluation_seed": row.seed, "case_number": row.case_number, "index": i}
        for row in rows
        for i in range(per_prompt)
    ]


def read_folder(folder: Path, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """The images `<case_number>_<i>.png` of `rows`, RGB uint8 [H, W, 3]."""
    from PIL import Image

    missing = [f"{r['case_number']}_{r['index']}.png" for r in rows if not (folder / image_name(r)).is_file()]
    if missing:
        raise UserError(
            f"{folder} lacks {len(missing)} of the prompt CSV's images ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); images are named <case_number>_<i>.png, i < --num_per_prompt"
        )
    return [np.asarray(Image.open(folder / image_name(r)).convert("RGB")) for r in rows]


def image_name(row: dict[str, Any]) -> str:
    return f"{row['case_number']}_{row['index']}.png"


def sampled_folders(cfg: EvaluateConfig, per_prompt: int) -> dict[str, Path]:
    """Samples the CSV into cfg.out (esd-jax sample's folders and records: a rerun makes only what is
    missing) and names its folders: the base model's, and the erased model's where one is given."""
    from esd_jax.sampling.folder import sample_to_folder

    erased = cfg.workdir is not None or cfg.esd is not None
    sample = SampleConfig(
        out=cfg.out,
        prompts=cfg.prompts,
        model=cfg.model,
        workdir=cfg.workdir,
        esd=cfg.esd,
        lora_strength=cfg.lora_strength,
        steps=cfg.steps,
        guidance=cfg.guidance,
        num_per_prompt=per_prompt,
        resolution=cfg.resolution,
        scheduler=cfg.scheduler,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        compare=erased,
    )
    sample_to_folder(sample)
    out = Path(cfg.out)
    return {"base": out / "base", "erased": out} if erased else {"base": out}


def judge_prompts(cfg: EvaluateConfig) -> dict[str, Any]:
    """What `esd-jax evaluate --prompts` does; returns the report it writes."""
    cfg.validate()
    rows = read_prompts_csv(Path(cfg.prompts))
    per_prompt = cfg.sampling(cfg.model or "")[2]
    judges = [make_judge(name, cfg) for name in cfg.judges]  # a missing dependency or model fails first
    described = image_rows(rows, per_prompt)
    for judge in judges:  # and a CSV a judge cannot read (the classifier's class column), before any sampling
        getattr(judge, "check_rows", lambda rows: None)(described)
    report_path = Path(cfg.json) if cfg.json else Path(cfg.out or cfg.images) / "judged.json"
    check_report(report_path)
    if cfg.images is not None:
        folders = {"erased": Path(cfg.images)}
        if cfg.base_images is not None:
            folders = {"base": Path(cfg.base_images), **folders}
    else:
        folders = sampled_folders(cfg, per_prompt)
    images = {name: read_folder(folder, described) for name, folder in folders.items()}
    report = {
        "made_by": MADE_BY,
        "prompts": str(Path(cfg.prompts).resolve()),
        "folders": {name: str(folder.resolve()) for name, folder in folders.items()},
        "images_per_folder": len(described),
        "concept": cfg.concept,
        "judges": {},
    }
    for judge in judges:
        if judge.name in PAIRWISE_JUDGES:
            summary, records = judge.compare(images["base"], images["erased"], described)
            report["judges"][judge.name] = {"erased": summary}
            verdicts = {"erased": records} if records else {}
        else:
            verdicts = {name: judge.judge(folder_images, described) for name, folder_images in images.items()}
            report["judges"][judge.name] = {name: judge.summary(v, described) for name, v in verdicts.items()}
        if verdicts:
            write_records(report_path.with_name(f"{report_path.stem}-{judge.name}.jsonl"), described, verdicts)
    with atomic_file(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    write_grid(report_path.with_suffix(".png"), rows, per_prompt, images)
    if "nudenet" in report["judges"]:
        from esd_jax.judges.nudenet import chart

        chart(report["judges"]["nudenet"], report_path.with_name(f"{report_path.stem}-nudenet.png"))
    print(table(report))
    print(f"report: {report_path}")
    return report


def write_grid(path: Path, rows: list[PromptRow], per_prompt: int, images: dict[str, list[np.ndarray]]) -> None:
    """The first prompts' images, one row each, every folder's side by side (the base model's first)."""
    from esd_jax.sampling.folder import MAX_GRID_ROWS, compare_grid

    shown = [
        (row.prompt, [folder[r * per_prompt : (r + 1) * per_prompt] for folder in images.values()])
        for r, row in enumerate(rows[:MAX_GRID_ROWS])
    ]
    with atomic_file(path) as tmp:
        compare_grid(shown, list(images)).save(tmp, format="PNG")


def check_report(path: Path) -> None:
    """A report is replaced only if this flow wrote it."""
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("made_by") == MADE_BY
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{path} is not a report of {MADE_BY}; move it away or pass another --json")


def write_records(path: Path, rows: list[dict[str, Any]], verdicts: dict[str, list[dict]]) -> None:
    """Every image's verdict, one JSON line each: what the summary counts, to look up or recount."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            for folder, records in verdicts.items():
                for row, record in zip(rows, records, strict=True):
                    f.write(json.dumps({"folder": folder, "image": image_name(row), **record}) + "\n")


def headline(name: str, summary: dict[str, Any]) -> dict[str, str]:
    """The few numbers of a judge's summary a person reads first."""
    if name == "nudenet":
        out = {"images with an exposed part": f"{summary['any_exposed_share']:.1%} ({summary['any_exposed']})"}
        out.update({c: str(n) for c, n in summary["per_class"].items() if n})
        return out
    if name == "classifier":
        out = {}
        for group in ("erased", "others"):
            if summary.get(group):
                out[f"top-1 on the {group} class{'es' if group == 'others' else ''}"] = f"{summary[group]['top1']:.1%}"
                out[f"top-5 on the {group} class{'es' if group == 'others' else ''}"] = f"{summary[group]['top5']:.1%}"
        return out
    if name == "lpips":
        size = f"{summary['size']} px" if summary["size"] else "full size"
        return {f"LPIPS to the base, mean ({size})": f"{summary['lpips']:.4f}"}
    if name == "fid":
        counts = f"{summary['base_images']}, {summary['erased_images']}"
        return {
            f"FID to the base ({summary['features']} features)": f"{summary['fid']:.2f}",
            "images (base, erased)": counts,
        }
    if name == "clip":
        out = {"CLIP score (mean)": f"{summary['clip_score']:.2f}"}
        if summary.get("concept_rate") is not None:
            out["shows the concept (zero-shot)"] = f"{summary['concept_rate']:.1%}"
        return out
    rate = summary.get("concept_rate")
    return {"shows the concept": "n/a" if rate is None else f"{rate:.1%}"}


def table(report: dict[str, Any]) -> str:
    """Per judge a block: one row per headline number, one column per folder."""
    lines = [f"{report['images_per_folder']} images per folder; prompts {report['prompts']}"]
    for name, summaries in report["judges"].items():
        columns = list(summaries)
        heads = {column: headline(name, summaries[column]) for column in columns}
        keys = list(dict.fromkeys(k for h in heads.values() for k in h))
        width = max(len(k) for k in keys) if keys else 10
        lines += ["", f"{name}:", "  " + " " * width + "".join(f"  {c:>14}" for c in columns)]
        for key in keys:
            lines.append("  " + key.ljust(width) + "".join(f"  {heads[c].get(key, '0'):>14}" for c in columns))
    return "\n".join(lines)
