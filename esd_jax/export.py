"""Erased weights back to PyTorch: the official ESD delta file, a diffusers folder, a single file."""

import json
from pathlib import Path

from esd_jax.errors import UserError
from esd_jax.run import apply_run, read_config

EXPORT_FORMATS = ("diffusers", "single-file")


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
