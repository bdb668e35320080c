"""Erased weights back to PyTorch: a diffusers folder or a single file (the run writes the official delta file)."""

import json
import os
from pathlib import Path

from esd_jax.errors import UserError
from esd_jax.run import apply_run, read_config

EXPORT_FORMATS = ("diffusers", "single-file")


STAMP = "esd_jax_export.json"  # in an exported folder: what made it, and leave to replace it


def export_run(workdir: Path, out: Path, *, step: int | None = None, fmt: str = "diffusers") -> Path:
    """Writes the run's pipeline, its UNet carrying the checkpoint's trained weights, for PyTorch.

    `fmt` "diffusers" writes a folder `StableDiffusion(XL)Pipeline.from_pretrained` loads; "single-file"
    one .safetensors in the original Stable Diffusion (SGM for SDXL) layout (A1111, ComfyUI). An existing `out` is
    replaced only if an earlier export wrote it: never the run, the base model or anything else.
    """
    from esd_jax import single_file
    from esd_jax.pipeline import locate

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "single-file" and out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    cfg = read_config(workdir)
    protected = {"the run's checkpoints": Path(workdir) / "checkpoints", "the run's base model": locate(cfg.model)}
    check_out(out, protected, workdir, fmt)
    pipe, _, restored = apply_run(None, workdir, step=step)
    stamp = {"workdir": str(Path(workdir).absolute()), "step": restored}
    if fmt == "diffusers":
        pipe.save_pretrained(out, extra={STAMP: stamp})
    else:
        single_file.write_single_file(pipe, out, {"esd_jax_export": json.dumps(stamp)})
    return out


def check_out(out: Path, keep: dict[str, Path], workdir: Path, fmt: str) -> None:
    """Refuses an `out` that would replace or sit inside one of the folders in `keep`, or an existing
    output that esd-jax export did not write."""
    target = out.resolve()
    for what, folder in keep.items():
        folder = folder.resolve()
        if target == folder or folder.is_relative_to(target) or target.is_relative_to(folder):
            raise UserError(f"--out {out} would write over {what} ({folder}); choose an output outside it")
    if fmt == "diffusers" and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a diffusers export is a folder: choose a folder name")
    if fmt != "diffusers" and out.is_dir():
        raise UserError(f"--out {out} is a folder; a single-file export is a .safetensors file: choose a file name")
    if out.is_dir() and any(out.iterdir()):
        if not (out / STAMP).is_file():
            raise UserError(
                f"--out {out} is a folder esd-jax export did not write (no {STAMP}); choose a new or empty folder"
            )
        check_same_workdir(out, json.loads((out / STAMP).read_text()).get("workdir"), workdir)
    if out.is_file():
        stamp = safetensors_metadata(out).get("esd_jax_export")
        if stamp is None:
            raise UserError(f"--out {out} is a file esd-jax export did not write; choose a new file name")
        check_same_workdir(out, json.loads(stamp).get("workdir"), workdir)
    parent = out.absolute().parent
    try:  # before anything is loaded: the folder the output goes to can be made
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


def check_same_workdir(out: Path, exported_from: str | None, workdir: Path) -> None:
    """An earlier export of another run may be that run's base model by now: only this run's is replaced."""
    if exported_from != str(Path(workdir).absolute()):
        raise UserError(f"--out {out} holds an export of another run ({exported_from}); choose a new output")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's metadata, {} for a file that is not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises bare exceptions for foreign files
        return {}
