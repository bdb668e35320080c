"""Erased weights back to PyTorch: the official ESD delta file, a diffusers folder, a single file."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.files import atomic_file
from esd_jax.run import apply_run, read_config

EXPORT_FORMATS = ("diffusers", "single-file")


# File systems allow 255 bytes a name; the atomic write's temporary adds about 30 to this.
MAX_DELTA_NAME = 200


def delta_filename(concept: str, erase_from: str, method: str) -> str:
    """The official esd_sd.py's name: esd-<concept>-from-<erase_from or concept>-<method without '-'>.

    A name too long for a file system (a dozen concepts) keeps its start and ends in a hash of the prompts.
    """

    def clean(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", text.strip().replace(" ", "_"))

    name = f"esd-{clean(concept)}-from-{clean(erase_from or concept)}-{method.replace('-', '')}.safetensors"
    if len(name.encode()) <= MAX_DELTA_NAME:
        return name
    digest = hashlib.sha256(f"{concept}\0{erase_from}".encode()).hexdigest()[:12]
    tail = f"-{digest}-{method.replace('-', '')}.safetensors"
    head = name.encode()[: MAX_DELTA_NAME - len(tail)].decode(errors="ignore")
    return head + tail


def write_delta(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Writes diffusers-keyed tensors for `unet.load_state_dict(load_file(path), strict=False)`, atomically."""
    with atomic_file(path) as tmp:
        weights.write_safetensors(tensors, tmp)


STAMP = "esd_jax_export.json"  # in an exported folder: what made it, and leave to replace it


def export_run(workdir: Path, out: Path, *, step: int | None = None, fmt: str = "diffusers") -> Path:
    """Writes the run's pipeline, its UNet carrying the checkpoint's trained weights, for PyTorch.

    `fmt` "diffusers" writes a folder `StableDiffusionPipeline.from_pretrained` loads; "single-file"
    one .safetensors in the original Stable Diffusion layout (A1111, ComfyUI). An existing `out` is
    replaced only if an earlier export wrote it: never the run, the base model or anything else.
    """
    from esd_jax import single_file
    from esd_jax.pipeline import locate

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "single-file" and out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    cfg = read_config(workdir)
    check_out(out, {"the run's checkpoints": Path(workdir) / "checkpoints", "the run's base model": locate(cfg.model)})
    pipe, _, restored = apply_run(None, workdir, step=step)
    stamp = {"workdir": str(Path(workdir).absolute()), "step": restored}
    if fmt == "diffusers":
        pipe.save_pretrained(out, extra={STAMP: stamp})
    else:
        single_file.write_single_file(pipe, out, {"esd_jax_export": json.dumps(stamp)})
    return out


def check_out(out: Path, keep: dict[str, Path]) -> None:
    """Refuses an `out` that would replace or sit inside one of the folders in `keep`, or an existing
    output that esd-jax export did not write."""
    target = out.resolve()
    for what, folder in keep.items():
        folder = folder.resolve()
        if target == folder or folder.is_relative_to(target) or target.is_relative_to(folder):
            raise UserError(f"--out {out} would write over {what} ({folder}); choose an output outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / STAMP).is_file():
        raise UserError(
            f"--out {out} is a folder esd-jax export did not write (no {STAMP}); choose a new or empty folder"
        )
    if out.is_file() and "esd_jax_export" not in safetensors_metadata(out):
        raise UserError(f"--out {out} is a file esd-jax export did not write; choose a new file name")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's metadata, {} for a file that is not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises bare exceptions for foreign files
        return {}
