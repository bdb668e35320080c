"""Measures an erasure on the toy world: how often the erased concept still appears, and what else changed.

A concept of the world (a colour, a shape or a style) splits the prompts into three groups:
- "concept": prompts that name it ("red", "a red circle", "a circle, red", ...). Erasure must drive
  the concept's rate here to zero, while the other attribute they name (the shape of "a red circle")
  should survive;
- "others": prompts that name another value of the same attribute ("green", "a green circle", ...),
  whose accuracy on that attribute erasure must keep;
- "unnamed": prompts that do not name the attribute ("a circle"): how often the concept appears unasked.
Image i of every prompt starts from the same noise for the base and the erased model, so the two
columns differ only by the edit; the oracle reads every image.
The picture and the JSON report carry their maker (a PNG text chunk; a "made_by" key), and an existing
file without it is never replaced: --grid or --json naming another file is refused before sampling.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from esd_jax.config import EMBEDDED_NAME, EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.files import atomic_file, check_writable
from esd_jax.pipeline import StableDiffusion
from esd_jax.sampling.folder import compare_grid
from esd_jax.sampling.record import made_by, mark
from esd_jax.sampling.sampler import Sampler, make_items, to_uint8
from esd_jax.toy import oracle, world

ATTRIBUTES = {"colour": world.COLOURS, "shape": world.SHAPES, "style": world.STYLES}
# The (colour, shape) pairs that carry a style in the style prompts: every colour and every shape once.
STYLED_PAIRS = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"))
WORDS = tuple(v for values in ATTRIBUTES.values() for v in values)
GROUPS = ("concept", "others", "unnamed")
GRID_IMAGES = 8  # images per prompt and side in the picture
GRID_ZOOM = 2  # 32-pixel images are too small to look at
MADE_BY = "esd-jax evaluate"  # the picture's PNG "Software" text and the report's "made_by"
MAX_REPORT_BYTES = 2**24  # a report is tens of kilobytes: a larger file is not one, and is not read whole


@dataclasses.dataclass(frozen=True)
class Concept:
    attribute: str  # "colour", "shape" or "style"
    value: str  # one of world.COLOURS, world.SHAPES or world.STYLES


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    group: str  # one of GROUPS
    names: tuple[tuple[str, str], ...]  # (attribute, value) pairs the prompt names


def parse_concept(text: str) -> Concept:
    for attribute, values in ATTRIBUTES.items():
        if text.strip().lower() in values:
            return Concept(attribute, text.strip().lower())
    known = "; ".join(f"{a}s: {', '.join(v)}" for a, v in ATTRIBUTES.items())
    raise UserError(f"concept {text!r} is not a concept of the toy world ({known})")


def run_concept(cfg) -> str:
    """The world word every prompt of an erase run names ("red" for "red|a red circle"), if there is one."""
    words = set(WORDS)
    for text in cfg.concepts if cfg is not None else []:
        words &= {w.strip(",") for w in text.lower().split()}
    if len(words) != 1:
        raise UserError("give --concept: a colour, shape or style of the toy world, e.g. --concept red")
    return words.pop()


def prompt(text: str, group: str, **names: str) -> Prompt:
    return Prompt(text, group, tuple(names.items()))


def prompts_for(concept: Concept) -> list[Prompt]:
    """The concept's prompts, the other values' prompts and the prompts that leave the attribute unnamed."""
    out = []
    for value in ATTRIBUTES[concept.attribute]:
        group = "concept" if value == concept.value else "others"
        if concept.attribute == "colour":
            out.append(prompt(value, group, colour=value))
            out += [prompt(f"a {value} {s}", group, colour=value, shape=s) for s in world.SHAPES]
            out += [prompt(f"a {s}, {value}", group, colour=value, shape=s) for s in world.SHAPES]
        elif concept.attribute == "shape":
            out.append(prompt(f"a {value}", group, shape=value))
            out += [prompt(f"a {c} {value}", group, colour=c, shape=value) for c in world.COLOURS]
            out += [prompt(f"a {value}, {c}", group, colour=c, shape=value) for c in world.COLOURS]
        else:
            out.append(prompt(value, group, style=value))
            out += [prompt(f"a {c} {s}, {value}", group, colour=c, shape=s, style=value) for c, s in STYLED_PAIRS]
    if concept.attribute == "colour":
        out += [prompt(f"a {s}", "unnamed", shape=s) for s in world.SHAPES]
    elif concept.attribute == "shape":
        out += [prompt(c, "unnamed", colour=c) for c in world.COLOURS]
    else:
        out += [prompt(f"a {c} {s}", "unnamed", colour=c, shape=s) for c, s in STYLED_PAIRS]
    return out


def check_vocabulary(pipe: StableDiffusion, prompts: list[Prompt]) -> None:
    vocab = pipe.tokenizer.get_vocab()
    for word in sorted({w.strip(",") for p in prompts for w in p.text.split()}):
        if f"{word}</w>" not in vocab:
            raise UserError(
                f"the model's tokenizer does not know the word {word!r}: evaluate measures the toy world, "
                "so pass --model toy (or a model trained on it)"
            )


def check_images(pipe: StableDiffusion) -> None:
    """The oracle reads the world's images: RGB, world.SIZE pixels a side, the size evaluate samples at."""
    size, channels = pipe.native_resolution, pipe.vae.config.out_channels
    if (size, channels) != (world.SIZE, 3):
        raise UserError(
            f"evaluate judges only the toy world's {world.SIZE} px RGB (3-channel) images, and this model makes "
            f"{size} px {channels}-channel images: pass --model toy (or a model trained on the toy world)"
        )


def check_model(pipe: StableDiffusion, prompts: list[Prompt]) -> None:
    """Everything evaluate needs of a model, checked before anything is sampled."""
    check_images(pipe)
    check_vocabulary(pipe, prompts)


def sample_prompts(sampler: Sampler, prompts: list[Prompt], settings: EvaluateConfig) -> np.ndarray:
    """Images [len(prompts), num_per_prompt, H, W, 3] uint8, prompt by prompt."""
    items = make_items([p.text for p in prompts], settings.seed, settings.num_per_prompt)
    images = None
    for positions, rows, _ in sampler.batches(items, gather=True):
        if images is None:
            images = np.zeros((len(items), *rows.shape[1:]), np.uint8)
        images[positions] = to_uint8(rows)
    return images.reshape(len(prompts), settings.num_per_prompt, *images.shape[1:])


def judge(images: np.ndarray) -> oracle.Reading:
    """The oracle's reading of uint8 images [..., H, W, 3], flattened to [N]."""
    flat = images.reshape(-1, *images.shape[-3:]).astype(np.float32) / 127.5 - 1.0
    return oracle.read(flat.transpose(0, 3, 1, 2))


def measure(concept: Concept, prompts: list[Prompt], images: np.ndarray) -> dict[str, Any]:
    """Per group and per prompt: the concept's rate and the accuracy on each attribute the prompts name."""
    reading = judge(images)
    per_image = {a: getattr(reading, a).reshape(len(prompts), -1) for a in ATTRIBUTES}

    def stats(indices: list[int]) -> dict[str, Any]:
        seen = per_image[concept.attribute][indices]
        accuracy = {}
        for attribute in ATTRIBUTES:
            hits = [
                per_image[attribute][i] == dict(prompts[i].names)[attribute]
                for i in indices
                if attribute in dict(prompts[i].names)
            ]
            if hits:
                accuracy[attribute] = float(np.mean(hits))
        return {"images": int(seen.size), "concept_rate": float(np.mean(seen == concept.value)), "accuracy": accuracy}

    return {
        "groups": {g: stats([i for i, p in enumerate(prompts) if p.group == g]) for g in GROUPS},
        "prompts": {p.text: stats([i]) for i, p in enumerate(prompts)},
    }


def evaluation_sampler(pipe: StableDiffusion, settings: EvaluateConfig, prompts: int) -> Sampler:
    """The sampler of `prompts` prompts, `settings.num_per_prompt` images each."""
    return Sampler(
        pipe,
        steps=settings.steps,
        guidance=settings.guidance,
        batch_size=settings.batch_size,
        images=prompts * settings.num_per_prompt,
    )


def toy_settings(settings: EvaluateConfig) -> EvaluateConfig:
    """`settings` with the toy model's sampling defaults where they are left to the model (None)."""
    steps, guidance, per_prompt = settings.sampling(EMBEDDED_NAME)
    return dataclasses.replace(settings, steps=steps, guidance=guidance, num_per_prompt=per_prompt)


def quality(pipe: StableDiffusion, settings: EvaluateConfig) -> dict[str, Any]:
    """The quality gate: over the 12 "a {colour} {shape}" prompts, how often the oracle reads the
    prompt's colour and shape, and what it read for each prompted shape (counts, "none" included)."""
    settings = toy_settings(settings)
    prompts = [f"a {c} {s}" for c in world.COLOURS for s in world.SHAPES]
    asked = np.array([text.split()[1:] for text in prompts]).repeat(settings.num_per_prompt, axis=0)
    sampler = evaluation_sampler(pipe, settings, len(prompts))
    reading = judge(sample_prompts(sampler, [prompt(t, "others") for t in prompts], settings))
    return {
        "colour": float(np.mean(reading.colour == asked[:, 0])),
        "shape": float(np.mean(reading.shape == asked[:, 1])),
        "confusion": {
            s: {v: int(np.sum(reading.shape[asked[:, 1] == s] == v)) for v in (*world.SHAPES, oracle.NONE)}
            for s in world.SHAPES
        },
    }


def grid_rows(concept: Concept, prompts: list[Prompt]) -> list[int]:
    """Which prompts the picture shows: every prompt naming the concept, and one full prompt of each other value."""
    shown, values = [], set()
    for i, p in enumerate(prompts):
        names = dict(p.names)
        if p.group == "concept" or (p.group == "others" and len(names) > 1 and names[concept.attribute] not in values):
            shown.append(i)
            values.add(names[concept.attribute])
    return shown


def write_grid(
    path: Path, concept: Concept, prompts: list[Prompt], base: np.ndarray, erased: np.ndarray | None
) -> None:
    def zoom(images: np.ndarray) -> list[np.ndarray]:
        return [x.repeat(GRID_ZOOM, axis=0).repeat(GRID_ZOOM, axis=1) for x in images[:GRID_IMAGES]]

    rows = [
        (prompts[i].text, [zoom(base[i])] + ([] if erased is None else [zoom(erased[i])]))
        for i in grid_rows(concept, prompts)
    ]
    labels = ("base",) if erased is None else ("base", "erased")
    with atomic_file(path) as tmp:
        compare_grid(rows, labels).save(tmp, format="PNG", pnginfo=mark(MADE_BY))


def evaluate(
    pipe: StableDiffusion,
    concept: Concept,
    erased_unet=None,
    settings: EvaluateConfig | None = None,
    grid: Path | None = None,
) -> dict[str, Any]:
    """Samples every prompt of `concept`'s groups with the base pipeline and, if given, with the erased UNet
    (an nnx module of the same architecture); writes the picture to `grid`; returns the report (`report`)."""
    settings = toy_settings(EvaluateConfig() if settings is None else settings)
    prompts = prompts_for(concept)
    check_model(pipe, prompts)
    sampler = evaluation_sampler(pipe, settings, len(prompts))
    base = sample_prompts(sampler, prompts, settings)
    erased = None
    if erased_unet is not None:
        sampler.set_unet(erased_unet)
        erased = sample_prompts(sampler, prompts, settings)
    if grid is not None:
        write_grid(grid, concept, prompts, base, erased)
    measured = {"base": measure(concept, prompts, base)}
    if erased is not None:
        measured["erased"] = measure(concept, prompts, erased)
    return report(concept, prompts, settings, measured)


def report(
    concept: Concept, prompts: list[Prompt], settings: EvaluateConfig, measured: dict[str, dict]
) -> dict[str, Any]:
    """The JSON record: the four headline fractions (None for a model not given), then every group and
    prompt, base and erased."""
    sides = ("base", "erased")
    out: dict[str, Any] = {"concept": concept.value, "attribute": concept.attribute}
    for side in sides:
        m = measured.get(side)
        out[f"concept_rate_{side}"] = m["groups"]["concept"]["concept_rate"] if m else None
    for side in sides:
        m = measured.get(side)
        out[f"others_accuracy_{side}"] = m["groups"]["others"]["accuracy"][concept.attribute] if m else None
    out["settings"] = dataclasses.asdict(settings)
    out["groups"] = {g: {side: measured[side]["groups"][g] for side in measured} for g in GROUPS}
    out["prompts"] = {
        p.text: {"group": p.group, **{side: measured[side]["prompts"][p.text] for side in measured}} for p in prompts
    }
    return out


def table(report: dict[str, Any]) -> str:
    """The report as a terminal table: one line per (group, measure), base and erased side by side."""
    concept, attribute = report["concept"], report["attribute"]
    sides = [s for s in ("base", "erased") if report[f"concept_rate_{s}"] is not None]
    titles = {
        "concept": f"prompts naming {concept}",
        "others": f"other {attribute}s' prompts",
        "unnamed": f"prompts naming no {attribute}",
    }
    s = report["settings"]
    lines = [
        f"{concept!r} ({attribute}): {s['num_per_prompt']} images per prompt, DDIM {s['steps']} steps, "
        f"guidance {s['guidance']}, seed {s['seed']}",
        f"{'prompts':32s}{'measure':22s}" + "".join(f"{side:>8s}" for side in sides),
    ]
    for group in GROUPS:
        count = sum(p["group"] == group for p in report["prompts"].values())
        first = report["groups"][group][sides[0]]
        rows = [(f"{concept} rate", "concept_rate", None)]
        # In the concept's own group, the accuracy on its attribute is the concept rate again.
        rows += [(f"{a} accuracy", "accuracy", a) for a in first["accuracy"] if group != "concept" or a != attribute]
        if group == "others":  # the headline: the attribute's accuracy first
            rows.sort(key=lambda r: r[2] != attribute)
        for n, (label, key, sub) in enumerate(rows):
            name = f"{titles[group]} ({count})" if n == 0 else ""
            values = [report["groups"][group][side][key] for side in sides]
            values = [v if sub is None else v[sub] for v in values]
            lines.append(f"{name:32s}{label:22s}" + "".join(f"{v:8.2f}" for v in values))
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"made_by": MADE_BY, **report}, indent=2) + "\n")


def report_maker(path: Path) -> str | None:
    """The "made_by" of a JSON report; None for any other file."""
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("made_by") if isinstance(data, dict) else None


def check_output(path: Path, flag: str, maker, example: str) -> None:
    """Refuses, before anything is sampled, an output path evaluate could not write or must not replace: a
    folder, one that cannot be created, or an existing file it did not write (`maker(path)` is not MADE_BY)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name, such as {path / example}")
    if path.exists() and maker(path) != MADE_BY:
        raise UserError(f"{flag} {path}: not made by esd-jax evaluate; move it away or pass another {flag}")
    try:
        check_writable(path)
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}; pass another {flag}") from None


def evaluate_erasure(cfg: EvaluateConfig) -> dict[str, Any]:
    """What `esd-jax evaluate` does: base against erased (a run's latest checkpoint, or a delta file), a
    table on the terminal, the picture (default: evaluate-<concept>.png in the run's workdir, else here)
    and, with `cfg.json`, the report as JSON."""
    from esd_jax.pipeline import load_pipeline
    from esd_jax.run import apply_erasure, base_model, check_erasure, read_config

    cfg.validate()
    workdir, esd = (None if p is None else Path(p) for p in (cfg.workdir, cfg.esd))
    check_erasure(workdir, esd, cfg.lora_strength)
    run_config = read_config(workdir) if workdir is not None else None
    parsed = parse_concept(run_concept(run_config) if cfg.concept is None else cfg.concept)
    model = base_model(cfg.model, workdir)
    steps, guidance, per_prompt = cfg.sampling(model)
    cfg = dataclasses.replace(cfg, steps=steps, guidance=guidance, num_per_prompt=per_prompt)
    grid = Path(cfg.grid) if cfg.grid else (workdir or Path(".")) / f"evaluate-{parsed.value}.png"
    check_output(grid, "--grid", made_by, f"evaluate-{parsed.value}.png")
    if cfg.json is not None:
        if Path(cfg.json).absolute() == grid.absolute():
            raise UserError(f"--json {cfg.json} is also the picture (--grid); pass another --json")
        check_output(Path(cfg.json), "--json", report_maker, f"evaluate-{parsed.value}.json")
    pipe = load_pipeline(model)
    check_model(pipe, prompts_for(parsed))  # before the erased model loads or anything is sampled
    erased = None
    if workdir is not None or esd is not None:
        erased = load_pipeline(model)
        apply_erasure(erased, workdir, esd, strength=cfg.lora_strength)
        erased = erased.unet
    result = evaluate(pipe, parsed, erased, cfg, grid)
    print(table(result))
    print(f"picture: {grid}")
    if cfg.json is not None:
        write_json(Path(cfg.json), result)
        print(f"report: {cfg.json}")
    return result


def attack_rows(cfg):
    """(cfg with its concept, the prompt rows) of `esd-jax attack` on the toy world without a prompt CSV:
    every prompt that names the concept (default: the run's), image i of each from the noise of (seed, i)."""
    from esd_jax.run import base_model, read_config
    from esd_jax.sampling.prompts import PromptRow

    workdir = Path(cfg.workdir) if cfg.workdir is not None else None
    run_config = read_config(workdir) if workdir is not None else None
    if base_model(cfg.model, workdir) != EMBEDDED_NAME:
        raise UserError("give --prompts FILE.csv: only the toy world knows its concept's prompts by itself")
    concept = parse_concept(run_concept(run_config) if cfg.concept is None else cfg.concept)
    texts = [p.text for p in prompts_for(concept) if p.group == "concept"]
    return dataclasses.replace(cfg, concept=concept.value), [PromptRow(t, cfg.seed, n) for n, t in enumerate(texts)]
