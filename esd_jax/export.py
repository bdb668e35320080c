"""Erased weights back to PyTorch: the official ESD delta file, a diffusers folder, a single file."""

import re
from pathlib import Path

import numpy as np

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.files import atomic_file
from esd_jax.run import apply_run

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


def export_run(workdir: Path, out: Path, *, step: int | None = None, fmt: str = "diffusers") -> Path:
    """Writes the run's pipeline, its UNet carrying the checkpoint's trained weights, for PyTorch.

    `fmt` "diffusers" writes a folder `StableDiffusionPipeline.from_pretrained` loads; "single-file"
    one .safetensors in the original Stable Diffusion layout (A1111, ComfyUI).
    """
    from esd_jax import single_file

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    pipe, _, _ = apply_run(None, workdir, step=step)
    if fmt == "diffusers":
        pipe.save_pretrained(out)
    else:
        out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
        single_file.write_single_file(pipe, out)
    return out
