"""Erased weights back to PyTorch: the official ESD delta file (trained parameters only)."""

import os
import re
from pathlib import Path

import numpy as np

from esd_jax import weights


def delta_filename(concept: str, erase_from: str, method: str) -> str:
    """The official esd_sd.py's name: esd-<concept>-from-<erase_from or concept>-<method without '-'>."""

    def clean(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", text.strip().replace(" ", "_"))

    return f"esd-{clean(concept)}-from-{clean(erase_from or concept)}-{method.replace('-', '')}.safetensors"


def write_delta(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Writes diffusers-keyed tensors for `unet.load_state_dict(load_file(path), strict=False)`, atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    weights.write_safetensors(tensors, tmp)
    tmp.replace(path)
