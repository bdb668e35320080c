"""Erased weights back to PyTorch: a diffusers folder, a single file, the delta, or a LoRA (kohya or diffusers).

A LoRA run's adapters are merged into the weights they adapt for the full formats; a full-weight run is
exported as a LoRA by a low-rank approximation of what it changed (`rank`).
"""

import json
import os
from pathlib import Path

from esd_jax.errors import UserError
from esd_jax.run import apply_run, read_config

EXPORT_FORMATS = ("diffusers", "single-file", "delta", "lora-kohya", "lora-diffusers")
FILE_FORMATS = EXPORT_FORMATS[1:]  # one .safetensors file each


STAMP = "esd_jax_export.json"  # in an exported folder: what made it, and leave to replace it


def export_run(
    workdir: Path, out: Path, *, step: int | None = None, fmt: str = "diffusers", rank: int | None = None
) -> Path:
    """Writes the run's checkpoint for PyTorch.

    `fmt` "diffusers" writes a folder `StableDiffusion(XL)Pipeline.from_pretrained` loads; "single-file"
    one .safetensors in the original Stable Diffusion (SGM for SDXL) layout (A1111, ComfyUI); "delta" the
    trained layers' weights under diffusers keys (the official ESD file); "lora-kohya" and "lora-diffusers"
    a LoRA (esd_jax.lora): a LoRA run's adapters, or with `rank` the truncated SVD of the change the run made
    to each weight, whose relative error is printed. An existing `out` is replaced only if an earlier export
    wrote it: never the run, the base model or anything else.
    """
    from esd_jax import single_file
    from esd_jax.pipeline import locate

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if rank is not None and (rank < 1 or not fmt.startswith("lora-")):
        raise UserError(f"--rank {rank}: give a rank of at least 1, with --format lora-kohya or lora-diffusers")
    if fmt in FILE_FORMATS and out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    cfg = read_config(workdir)
    if fmt.startswith("lora-") and not cfg.lora_rank and rank is None:
        raise UserError(
            f"{workdir} trained full weights (lora_rank 0): give --rank R to export the low-rank approximation "
            "of what it changed, e.g. --rank 4"
        )
    protected = {"the run's checkpoints": Path(workdir) / "checkpoints", "the run's base model": locate(cfg.model)}
    check_out(out, protected, workdir, fmt)
    if fmt in ("diffusers", "single-file"):
        pipe, _, restored = apply_run(None, workdir, step=step)
        stamp = {"workdir": str(Path(workdir).absolute()), "step": restored}
        if fmt == "diffusers":
            pipe.save_pretrained(out, extra={STAMP: stamp})
        else:
            single_file.write_single_file(pipe, out, {"esd_jax_export": json.dumps(stamp)})
        return out
    export_weights(workdir, out, step=step, fmt=fmt, rank=rank)
    return out


def export_weights(workdir: Path, out: Path, *, step: int | None, fmt: str, rank: int | None) -> None:
    """The "delta" and LoRA formats of export_run, from the trained weights alone."""
    from esd_jax import lora, weights
    from esd_jax.esd import trained_weights
    from esd_jax.files import atomic_file
    from esd_jax.run import restore_run, write_lora

    pipe, cfg, restored, trained, original = restore_run(None, workdir, step=step)
    kinds = weights.layouts(pipe.unet)
    stamp = {"esd_jax_export": json.dumps({"workdir": str(Path(workdir).absolute()), "step": restored})}
    tensors = weights.torch_tensors(trained_weights(trained, original), kinds)
    if fmt == "delta":
        with atomic_file(out) as tmp:
            weights.write_safetensors(tensors, tmp, stamp)
        return
    if rank is None:
        found = lora.factors(trained, kinds)
    else:
        found, error = lora.low_rank(tensors, weights.torch_tensors(original, kinds), rank)
        print(
            f"rank {rank} approximation of the run's change to {len(tensors)} tensors: relative error {error:.4f} "
            "(Frobenius norm of the residual over that of the change; biases, which a LoRA cannot carry, count "
            "as residual)"
        )
    write_lora(found, out, fmt.removeprefix("lora-"), stamp)


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
        raise UserError(f"--out {out} is a folder; a {fmt} export is a .safetensors file: choose a file name")
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
