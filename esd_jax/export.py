"""Erased weights back to PyTorch: the official ESD delta file, a diffusers folder, a single file."""

import json
import re
from pathlib import Path

import numpy as np

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.files import atomic_file

EXPORT_FORMATS = ("diffusers", "single-file")


def delta_filename(concept: str, erase_from: str, method: str) -> str:
    """The official esd_sd.py's name: esd-<concept>-from-<erase_from or concept>-<method without '-'>."""

    def clean(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", text.strip().replace(" ", "_"))

    return f"esd-{clean(concept)}-from-{clean(erase_from or concept)}-{method.replace('-', '')}.safetensors"


def write_delta(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Writes diffusers-keyed tensors for `unet.load_state_dict(load_file(path), strict=False)`, atomically."""
    with atomic_file(path) as tmp:
        weights.write_safetensors(tensors, tmp)


def read_run_config(workdir: Path):
    from esd_jax.config import EraseConfig

    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no erase run (no config.json); pass the --config.workdir of a run")
    return EraseConfig(**json.loads(path.read_text()))


def export_run(workdir: Path, out: Path, *, step: int | None = None, fmt: str = "diffusers") -> Path:
    """Writes the run's pipeline, its UNet carrying the checkpoint's trained weights, for PyTorch.

    `fmt` "diffusers" writes a folder `StableDiffusionPipeline.from_pretrained` loads; "single-file"
    one .safetensors in the original Stable Diffusion layout (A1111, ComfyUI).
    """
    from esd_jax import single_file

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    pipe, _ = apply_run(None, workdir, step=step)
    if fmt == "diffusers":
        pipe.save_pretrained(out)
    else:
        out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
        single_file.write_single_file(pipe, out)
    return out


def apply_run(pipe, workdir: Path, *, step: int | None = None):
    """Sets `pipe.unet`'s trained weights to the run's checkpoint at `step` (default: the latest).

    `pipe` None loads the run's model first. Returns (pipe, the run's EraseConfig).
    """
    import optax
    from flax import nnx

    from esd_jax import checkpoints
    from esd_jax.esd import initial_state
    from esd_jax.partition import trainable_filter
    from esd_jax.pipeline import load_pipeline

    cfg = read_run_config(workdir)
    pipe = load_pipeline(cfg.model) if pipe is None else pipe
    _, trainable, _ = nnx.split(pipe.unet, trainable_filter(pipe.unet, cfg.method), ...)
    manager = checkpoints.open_manager(workdir, read_only=True)
    try:
        state = checkpoints.restore(manager, initial_state(trainable, optax.adam(cfg.learning_rate), cfg.seed), step)
    finally:
        manager.close()
    nnx.update(pipe.unet, state.trainable)
    return pipe, cfg


def apply_delta(pipe, path: Path) -> None:
    """Loads an official-format ESD delta (a subset of the UNet's weights, diffusers keys) into `pipe.unet`."""
    tensors = weights.read_safetensors(path)
    current = weights.state_dict(pipe.unet)
    unknown = sorted(tensors.keys() - current.keys())
    if unknown:
        raise UserError(
            f"{path}: {unknown[0]!r} is not a UNet weight of this model ({len(unknown)} unknown keys); "
            "is the delta for another model, or not an ESD delta file?"
        )
    weights.load_state_dict(pipe.unet, {**current, **tensors}, source=str(path))
