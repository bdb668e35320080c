"""`esd-jax sample`: images of a prompt or a prompt CSV in a folder, base and erased, resumable; the grid."""

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from esd_jax import parallel
from esd_jax.config import EMBEDDED_NAME, SampleConfig
from esd_jax.errors import UserError
from esd_jax.files import atomic_file, fingerprint
from esd_jax.sampling.prompts import PromptRow, read_prompts_csv
from esd_jax.sampling.record import FOLDER_KEYS, RECORD, SAMPLE_MARK, FolderRecord, erased_weights, made_by, mark
from esd_jax.sampling.sampler import Item, Sampler, to_uint8

MAX_GRID_ROWS = 100  # compare.png shows at most this many prompts; a taller PNG is of no use to look at


def write_images(sampler: Sampler, jobs: list[tuple[Item, Path]], record: FolderRecord, *, desc: str) -> int:
    """Samples the jobs whose image file is missing, or not on record as made from the job's item, and
    writes them (this host's share) and their records; returns how many images all hosts made."""
    from PIL import Image
    from tqdm.auto import tqdm

    main = parallel.is_main_process()
    status = [record.status(path, dataclasses.asdict(item)) for item, path in jobs]
    redo = np.asarray([s != "kept" for s in status])
    if main and redo.any():
        for kind, why in (
            ("changed", "made from another prompt or seed"),
            ("unrecorded", f"that {record.path} has no record of (left by a killed run, or copied in)"),
        ):
            if kind in status:
                n = status.count(kind)
                print(f"{record.folder}: remaking {n} {'image' if n == 1 else 'images'} {why}")
        # Forget the images about to be remade before any is replaced: a kill midway must not leave a
        # new image under an old record, which a rerun with the old prompt would trust.
        stale = {path.name for (_, path), r in zip(jobs, redo, strict=True) if r}
        record.images = {name: r for name, r in record.images.items() if name not in stale}
        record.save()
    if jax.process_count() > 1:  # hosts agree on the work (any host's) before any writes an image
        from jax.experimental import multihost_utils

        redo = np.asarray(multihost_utils.process_allgather(redo)).reshape(-1, len(jobs)).any(axis=0)
    todo = [job for job, r in zip(jobs, redo, strict=True) if r]
    bar = tqdm(
        total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="img", disable=not main, dynamic_ncols=True
    )
    with bar:
        done = 0
        for positions, images, _ in sampler.batches([item for item, _ in todo]):
            for position, image in zip(positions, to_uint8(images), strict=True):
                with atomic_file(todo[position][1]) as tmp:
                    Image.fromarray(image).save(tmp, format="PNG", pnginfo=mark(SAMPLE_MARK))
            # Every host holds an equal share of each batch's rows, so the global count advances by
            # the batch's real rows; counting this host's rows times the process count would overshoot.
            count = min(sampler.batch_size, len(todo) - done)
            if jax.process_count() > 1:  # the record names an image only once its host has written it
                multihost_utils.sync_global_devices(f"esd-jax sample: {record.folder} batch {done}")
            if main:
                record.images.update((path.name, dataclasses.asdict(item)) for item, path in todo[done : done + count])
                record.save()
            done += count
            bar.update(count)
    return len(todo)


def compare_grid(rows: list[tuple[str, list[list[np.ndarray]]]], labels: Sequence[str] = ("base", "erased")):
    """A PIL image: one row per prompt (its text above), then its images side by side, one side per label
    (the base model's, the erased model's, ...); a side may be empty."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = rows[0][1][0][0].shape[:2]
    per_side = max(len(side) for _, sides in rows for side in sides)
    sides = len(labels)
    gap, label = 8, 16  # pixels between the sides; height of a text line
    width = max(sides * per_side * w + (sides - 1) * gap, 256)
    grid = Image.new("RGB", (width, label + len(rows) * (label + h)), "white")
    draw = ImageDraw.Draw(grid)
    for s, name in enumerate(labels):
        draw.text((s * (per_side * w + gap) + 2, 2), name, fill="black", font=font)
    for r, (prompt, images) in enumerate(rows):
        top = label + r * (label + h)
        text = prompt
        while text and draw.textlength(text, font=font) > width - 4:
            text = text[:-2] + "…"
        draw.text((2, top + 2), text, fill="black", font=font)
        for s, side in enumerate(images):
            for c, image in enumerate(side):
                grid.paste(Image.fromarray(image), (s * (per_side * w + gap) + c * w, top + label))
    return grid


def write_compare(out: Path, prompt_rows: list[PromptRow], num_per_prompt: int) -> Path:
    from PIL import Image

    def read(folder: Path, row: PromptRow) -> list[np.ndarray]:
        return [
            np.asarray(Image.open(folder / f"{row.case_number}_{i}.png").convert("RGB")) for i in range(num_per_prompt)
        ]

    shown = prompt_rows[:MAX_GRID_ROWS]
    if len(prompt_rows) > len(shown):
        print(f"compare.png shows the first {len(shown)} of {len(prompt_rows)} prompts")
    grid = compare_grid([(row.prompt, [read(out / "base", row), read(out, row)]) for row in shown])
    path = out / "compare.png"
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=mark(SAMPLE_MARK))
    return path


def make_out(folder: Path) -> None:
    """Creates an image folder and tries writing in it, so that a bad --out fails before any model loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {folder}: cannot create the folder ({e.strerror}); pass another --out") from None
    try:
        # A name of its own for every process: the hosts of a pod probe one shared folder at once.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{RECORD}.probe-"):
            pass
    except OSError as e:
        raise UserError(f"--out {folder}: cannot write in it ({e.strerror}); pass another --out") from None


def sample_to_folder(cfg: SampleConfig) -> int:
    """What `esd-jax sample` does: images `{case_number}_{i}.png` in `cfg.out` for a prompt or a prompt CSV,
    from the base model or the erased one (`workdir`: a run's checkpoint; `esd`: a delta file); with
    `compare`, the base model's in `out/base/` too and both side by side in `out/compare.png`.
    An image already there is kept if its folder's sample.json records it as made from the same inputs,
    so a rerun continues an interrupted one; any other is made (again), if it is one esd-jax wrote (its
    PNGs carry a mark): a file of the user's is refused, never replaced. Returns how many it made.
    """
    from esd_jax.pipeline import EMBEDDED, load_pipeline, locate
    from esd_jax.run import apply_erasure, base_model, check_erasure, model_name

    cfg.validate()
    out = Path(cfg.out)
    workdir, esd = (None if p is None else Path(p) for p in (cfg.workdir, cfg.esd))
    check_erasure(workdir, esd, cfg.lora_strength)
    rows = [PromptRow(cfg.prompt, cfg.seed, 0)] if cfg.prompt is not None else read_prompts_csv(Path(cfg.prompts))
    record = FolderRecord(out)
    base_record = FolderRecord(out / "base") if cfg.compare else None
    model = base_model(cfg.model, workdir)
    steps, guidance = cfg.sampling(model)
    scheduler, resolution, dtype, num_per_prompt = cfg.scheduler, cfg.resolution, cfg.dtype, cfg.num_per_prompt

    def jobs(folder: Path) -> list[tuple[Item, Path]]:
        return [
            (Item(row.prompt, row.seed, i), folder / f"{row.case_number}_{i}.png")
            for row in rows
            for i in range(num_per_prompt)
        ]

    local = EMBEDDED if model == EMBEDDED_NAME else Path(model).expanduser()
    if local.is_dir() and out.resolve().is_relative_to(local.resolve()):
        raise UserError(
            f"--out {out} is inside the model folder {local.resolve()}, whose files sample.json tracks (every "
            "image written would change them); choose an --out outside it"
        )
    # Before any model loads: the folders can be written, and every file to be replaced is esd-jax's own.
    for r in (record, base_record) if base_record is not None else (record,):
        make_out(r.folder)
        r.check_ours([(dataclasses.asdict(item), path) for item, path in jobs(r.folder)])
    if cfg.compare and (out / "compare.png").exists() and made_by(out / "compare.png") != SAMPLE_MARK:
        raise UserError(f"{out / 'compare.png'}: not made by esd-jax sample; move it away or use another --out")

    parallel.initialize_distributed()
    model_folder = locate(model)
    base_settings = dict(
        model=model_name(model),
        workdir=None,
        esd=None,
        model_files=fingerprint(model_folder),
        esd_sha256=None,
        lora_strength=1.0,
        steps=steps,
        guidance=float(guidance),
        scheduler=scheduler,
        resolution=resolution,
        dtype=dtype,
        checkpoint_step=None,
        checkpoint_files=None,
    )
    settings = {**base_settings, **erased_weights(workdir, esd, cfg.lora_strength)}
    record.check(settings, FOLDER_KEYS)
    if base_record is not None:
        base_record.check(base_settings, FOLDER_KEYS)
        base_record.settings = base_settings
    pipe = load_pipeline(model_folder, dtype=dtype)
    # The sampler keeps the base weights it placed: loading others into `pipe` replaces arrays, not them.
    sampler = Sampler(
        pipe,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        resolution=resolution,
        batch_size=cfg.batch_size,
        images=len(rows) * num_per_prompt,
    )
    if workdir is not None or esd is not None:
        apply_erasure(pipe, workdir, esd, step=settings["checkpoint_step"], strength=cfg.lora_strength)
    record.settings = settings

    made = 0
    if base_record is not None:
        made += write_images(sampler, jobs(out / "base"), base_record, desc="base model")
    if workdir is not None or esd is not None:
        sampler.set_unet(pipe.unet)
    made += write_images(sampler, jobs(out), record, desc="erased model" if workdir or esd else "sampling")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("esd-jax sample: images written")
    if cfg.compare and parallel.is_main_process():
        write_compare(out, rows, num_per_prompt)
    return made
