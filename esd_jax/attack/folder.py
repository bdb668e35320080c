"""`esd-jax attack`: adversarial prompts against an erased model, and the concept's rate before and after.

For image i of every prompt (a CSV's rows, or the toy world's prompts that name the concept) the base
model draws it from the seed's noise; its latents z_0 are what the attacks target (search.py). The
erased model draws the same noise under the plain prompt (before the attack), under the embedding
attack's prefix and under the token attack's prompt, that one from its text as a person would type it.
One judge says which images show the concept; the attack success rate (ASR) is their share:

    OUT/base/       the base model, the plain prompt
    OUT/erased/     the erased model, the plain prompt: the ASR before the attack
    OUT/embedding/  the erased model, the embedding attack's prefix
    OUT/token/      the erased model, the token attack's prompt

attack.json is the report (the settings, every folder's ASR in all and per prompt, every attack's
prompt, tokens and losses); attacks.jsonl holds one line per attack as its images are written, so a
rerun with the same settings continues where one stopped, and one with others starts over;
attack-prompts.csv holds the token attacks' prompts as a prompt CSV (for `sample` and `evaluate`);
attack.png the images side by side; attack-loss.png the searches' mean loss per step.
"""

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esd_jax import conditioning, parallel
from esd_jax.attack.search import ATTACKERS, EVALUATION_STREAM, SEARCH_STREAM, Attacker
from esd_jax.config import EMBEDDED_NAME, AttackConfig
from esd_jax.errors import UserError
from esd_jax.files import atomic_file, fingerprint
from esd_jax.sampling.prompts import PromptRow
from esd_jax.sampling.record import erased_weights
from esd_jax.sampling.sampler import Item, Sampler, to_uint8
from esd_jax.schedulers import NoiseSchedule

FOLDERS = ("base", "erased", *ATTACKERS)
MADE_BY = "esd-jax attack"
SETTINGS, ATTACKS = "attack-settings.json", "attacks.jsonl"
EVALUATION_DRAWS = 16  # noisings per attack on which the plain prompt and both attacks' losses are compared
GRID_ROWS = 24  # prompts shown in attack.png
SMALL_IMAGE = 64  # images narrower than this are shown twice as large


@dataclasses.dataclass(frozen=True)
class Job:
    """One attack: image `index` of a prompt row."""

    row: PromptRow
    index: int

    @property
    def name(self) -> str:
        return f"{self.row.case_number}_{self.index}.png"

    @property
    def item(self) -> Item:
        return Item(self.row.prompt, self.row.seed, self.index)


def attack_to_folder(cfg: AttackConfig, rows: list[PromptRow]) -> dict[str, Any]:
    """What `esd-jax attack` does for the prompt `rows`; returns the report it writes."""
    from esd_jax.judges.evaluate import image_rows, make_judge
    from esd_jax.pipeline import load_pipeline, locate
    from esd_jax.run import apply_erasure, base_model, check_erasure, model_name
    from esd_jax.sampling.folder import make_out

    workdir, esd = (None if p is None else Path(p) for p in (cfg.workdir, cfg.esd))
    check_erasure(workdir, esd, cfg.lora_strength)
    model = base_model(cfg.model, workdir)
    judge_name = cfg.judge or ("toy" if model == EMBEDDED_NAME else None)
    if judge_name is None:
        raise UserError("give --judge (nudenet, classifier or clip): who says an image shows the concept")
    if judge_name == "clip" and cfg.concept is None:
        raise UserError("--judge clip needs --concept TEXT: the concept CLIP looks for")
    judge = make_judge(judge_name, cfg)
    steps, guidance, per_prompt = cfg.sampling(model)
    jobs = [Job(row, i) for row in rows for i in range(per_prompt)]
    described = image_rows(rows, per_prompt)  # what the judge knows of each job's image, in the jobs' order
    getattr(judge, "check_rows", lambda rows: None)(described)

    out = Path(cfg.out)
    make_out(out)
    model_folder = locate(model)
    settings = {
        "model": model_name(model),
        "model_files": fingerprint(model_folder),
        **erased_weights(workdir, esd, cfg.lora_strength),
        "prompts": [[r.prompt, r.seed, r.case_number] for r in rows],
        "num_per_prompt": per_prompt,
        "steps": steps,
        "guidance": guidance,
        **{k: getattr(cfg, k) for k in ("seed", "tokens", "attack_steps", "attack_lr", "draws")},
    }
    pipe = load_pipeline(model_folder)
    if pipe.is_xl:
        raise UserError("attack searches one text encoder's token embeddings: SD 1.x and 2.x, not SDXL's two")
    tokenizer = pipe.tokenizer
    ids = pipe.prompt_ids([r.prompt for r in rows])[0]
    fits = conditioning.slots_fit(ids, cfg.tokens, tokenizer.eos_token_id)
    if not fits.all():
        raise UserError(
            f"prompt {rows[int(np.argmin(fits))].prompt!r} leaves no room for {cfg.tokens} prefix tokens in the "
            f"text encoder's {ids.shape[1]}; shorten it or lower --tokens"
        )
    done = finished_attacks(out, settings)  # only now: other settings start over, and nothing is left to refuse
    todo = [j for j in jobs if j.name not in done]
    sampling = dict(steps=steps, guidance=guidance, batch_size=cfg.batch_size, images=max(len(todo), 1))
    base = Sampler(pipe, **sampling)
    apply_erasure(pipe, workdir, esd, step=settings["checkpoint_step"], strength=cfg.lora_strength)
    erased = Sampler(pipe, **sampling)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    attacker = Attacker(erased, schedule, pipe.text_encoder.config.vocab_size, tokenizer.all_special_ids)
    key = jax.random.key_data(jax.random.key(cfg.seed))
    positions = {j.name: n for n, j in enumerate(jobs)}

    from tqdm.auto import tqdm

    main = parallel.is_main_process()
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="attacking",
        unit="attack",
        disable=not main,
        dynamic_ncols=True,
    )
    with bar:
        for start in range(0, len(todo), erased.batch_size):
            chunk = todo[start : start + erased.batch_size]
            records = attack_chunk(
                cfg, chunk, [positions[j.name] for j in chunk], base, erased, attacker, pipe, key, out
            )
            if main:
                with open(out / ATTACKS, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            done.update((r["image"], r) for r in records)
            bar.update(len(chunk))

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("esd-jax attack: images written")
    if not main:
        return {}
    images = {folder: read_images(out / folder, jobs) for folder in FOLDERS}
    verdicts = {folder: judge.judge(images[folder], described) for folder in FOLDERS}
    shows = {folder: np.asarray([judge.shows(v) for v in verdicts[folder]]) for folder in FOLDERS}
    report = make_report(cfg, judge_name, settings, jobs, [done[j.name] for j in jobs], shows)
    with atomic_file(out / "attack.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    write_prompt_csv(out / "attack-prompts.csv", [done[j.name] for j in jobs])
    write_grid(out / "attack.png", rows, per_prompt, images)
    plot_curves(out / "attack-loss.png", [done[j.name] for j in jobs], report["title"])
    print(table(report))
    print(f"report: {out / 'attack.json'}")
    return report


def finished_attacks(out: Path, settings: dict[str, Any]) -> dict[str, dict]:
    """The attacks `out` already holds for these settings, by image name; with other settings (or none on
    record) it starts over, and a folder that is not an attack's is refused."""
    path = out / SETTINGS
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("made_by") != MADE_BY:
            raise UserError(f"{path} is not an attack's record; pass another --out")
        if recorded["settings"] == settings:
            lines = (out / ATTACKS).read_text().splitlines() if (out / ATTACKS).exists() else []
            found = {}
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: that attack is redone
                if all((out / folder / record["image"]).is_file() for folder in FOLDERS):
                    found[record["image"]] = record
            if found:
                print(f"{out}: continuing, {len(found)} attacks already done")
            return found
        print(f"{out}: made with other settings; starting over")
    elif any(out.iterdir()):
        raise UserError(f"--out {out} holds files that are not an attack's; pass another (or an empty) folder")
    if parallel.is_main_process():
        (out / ATTACKS).unlink(missing_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"made_by": MADE_BY, "settings": settings}, indent=2) + "\n")
    return {}


def attack_chunk(cfg, chunk: list[Job], indices: list[int], base, erased, attacker, pipe, key, out: Path) -> list[dict]:
    """One batch of attacks: their four folders' images written, their records returned."""
    from PIL import Image

    n, width = len(chunk), erased.batch_size
    pad = [chunk[0]] * (width - n)  # rows that fill the batch for the devices, dropped below

    def write(folder: str, images: np.ndarray) -> None:
        if not parallel.is_main_process():  # every host holds every image (gathered); one writes them
            return
        for job, image in zip(chunk, to_uint8(images), strict=True):
            with atomic_file(out / folder / job.name) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")

    def sampled(sampler, items, prefix=None) -> tuple[np.ndarray, np.ndarray]:
        images, latents = [], []
        for _, image_rows, latent_rows in sampler.batches(items, prefix=prefix, gather=True):
            images.append(image_rows)
            latents.append(latent_rows)
        return np.concatenate(images), np.concatenate(latents)

    items = [j.item for j in chunk]
    base_images, z0 = sampled(base, items)
    write("base", base_images)
    write("erased", sampled(erased, items)[0])

    prompts = [j.row.prompt for j in chunk + pad]
    plain = pipe.prompt_ids(prompts)[0]
    slotted = conditioning.with_slots(plain, cfg.tokens)
    rows = np.asarray(indices + [indices[0]] * len(pad), np.int32)
    z0 = np.concatenate([z0, z0[:1].repeat(len(pad), 0)])
    placed = [erased.sharded(x) for x in (slotted, z0, rows)]
    search_key = jax.random.fold_in(key, SEARCH_STREAM)
    evaluation_key = jax.random.fold_in(key, EVALUATION_STREAM)
    evaluation = attacker.settings("embedding", cfg.tokens, 1, cfg.attack_lr, EVALUATION_DRAWS)

    def evaluated(ids, prefix=None) -> np.ndarray:
        args = (erased.sharded(ids), None if prefix is None else prefix, placed[1], placed[2])
        return np.asarray(attacker.losses(evaluation, *args, evaluation_key))[:n]

    records = [
        {
            "image": j.name,
            "prompt": j.row.prompt,
            "evaluation_seed": j.row.seed,
            "case_number": j.row.case_number,
            "index": j.index,
        }
        for j in chunk
    ]
    losses = {"plain": evaluated(plain)}
    for name in ATTACKERS:
        settings = attacker.settings(name, cfg.tokens, cfg.attack_steps, cfg.attack_lr, cfg.draws)
        prefix, tokens, curve = attacker.search(settings, *placed[:2], placed[2], search_key)
        tokens, curve = np.asarray(tokens)[:n], np.asarray(curve)[:n]
        for record, row_tokens, row_curve in zip(records, tokens, curve, strict=True):
            record[f"{name}_tokens"] = [int(t) for t in row_tokens]
            record[f"{name}_curve"] = [float(x) for x in row_curve]
        if name == "embedding":
            write(name, sampled(erased, items, prefix=np.asarray(prefix)[:n])[0])
            losses[name] = evaluated(slotted, prefix)
        else:
            typed = [typed_prompt(pipe.tokenizer, t, j.row.prompt) for t, j in zip(tokens, chunk, strict=True)]
            for record, text in zip(records, typed, strict=True):
                record["token_prompt"] = text
            write(
                name,
                sampled(erased, [Item(text, j.row.seed, j.index) for text, j in zip(typed, chunk, strict=True)])[0],
            )
            losses[name] = evaluated(pipe.prompt_ids(typed + [typed[0]] * len(pad))[0])
    for i, record in enumerate(records):
        record["loss"] = {name: float(values[i]) for name, values in losses.items()}
    return records


def typed_prompt(tokenizer, tokens: np.ndarray, prompt: str) -> str:
    """The text a person would type for the prefix `tokens` before `prompt`: both decoded together, so a
    token that ends mid-word joins the word after it as typing would."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer.decode(
        [*map(int, tokens), *ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
    ).strip()


def read_images(folder: Path, jobs: list[Job]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(folder / j.name).convert("RGB")) for j in jobs]


def make_report(cfg, judge_name: str, settings, jobs: list[Job], records: list[dict], shows: dict) -> dict[str, Any]:
    concept = cfg.concept or "the concept"
    per_prompt: dict[str, dict[str, list]] = {}
    for n, job in enumerate(jobs):
        entry = per_prompt.setdefault(job.row.prompt, {folder: [] for folder in FOLDERS})
        for folder in FOLDERS:
            entry[folder].append(bool(shows[folder][n]))
    return {
        "made_by": MADE_BY,
        "title": f"attack on {Path(settings['workdir'] or settings['esd']).name}: {judge_name} judges {concept}",
        "judge": judge_name,
        "concept": cfg.concept,
        "attacks": len(jobs),
        "success_rate": {folder: float(np.mean(shows[folder])) for folder in FOLDERS},
        "loss": {name: float(np.mean([r["loss"][name] for r in records])) for name in ("plain", *ATTACKERS)},
        "prompts": {p: {f: float(np.mean(v)) for f, v in entry.items()} for p, entry in per_prompt.items()},
        "settings": settings,
        "records": records,
    }


def table(report: dict[str, Any]) -> str:
    """The success rate per folder, in all and per prompt, and the mean denoising losses."""
    width = max(len(p) for p in [*report["prompts"], "all prompts"]) + 2
    head = "".join(f"{f:>11}" for f in FOLDERS)
    lines = [
        f"{report['title']}; {report['attacks']} attacks",
        "share of images that show the concept (base and erased: the plain prompt; embedding, token: the attacks)",
        " " * width + head,
        "all prompts".ljust(width) + "".join(f"{report['success_rate'][f]:>11.2f}" for f in FOLDERS),
    ]
    lines += [p.ljust(width) + "".join(f"{rates[f]:>11.2f}" for f in FOLDERS) for p, rates in report["prompts"].items()]
    loss = report["loss"]
    lines.append(
        f"erased model's denoising loss on the base model's images: plain {loss['plain']:.4f}, "
        f"embedding attack {loss['embedding']:.4f}, token attack {loss['token']:.4f}"
    )
    return "\n".join(lines)


def write_prompt_csv(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "evaluation_seed", "case_number", "attacked_prompt", "index"])
            for r in records:
                writer.writerow([r["token_prompt"], r["evaluation_seed"], r["case_number"], r["prompt"], r["index"]])


def write_grid(path: Path, rows: list[PromptRow], per_prompt: int, images: dict[str, list[np.ndarray]]) -> None:
    from esd_jax.sampling.folder import compare_grid

    def shown(folder: list[np.ndarray]) -> list[np.ndarray]:
        zoom = 2 if folder[0].shape[1] < SMALL_IMAGE else 1
        return [x.repeat(zoom, axis=0).repeat(zoom, axis=1) for x in folder]

    grid = [
        (row.prompt, [shown(images[f][r * per_prompt : (r + 1) * per_prompt]) for f in FOLDERS])
        for r, row in enumerate(rows[:GRID_ROWS])
    ]
    with atomic_file(path) as tmp:
        compare_grid(grid, FOLDERS).save(tmp, format="PNG")


def plot_curves(path: Path, records: list[dict], title: str) -> None:
    """Each attacker's denoising loss per search step, the mean over attacks with its interquartile band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, colour in zip(ATTACKERS, ("tab:red", "tab:blue"), strict=True):
        curves = np.asarray([r[f"{name}_curve"] for r in records])
        steps = np.arange(1, curves.shape[1] + 1)
        ax.plot(steps, curves.mean(axis=0), color=colour, lw=2, label=f"{name} attack, mean")
        lo, hi = np.percentile(curves, [25, 75], axis=0)
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.15)
    ax.axhline(np.mean([r["loss"]["plain"] for r in records]), color="grey", ls="--", label="plain prompt")
    ax.set_xlabel("attack step")
    ax.set_ylabel("erased model's denoising loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
