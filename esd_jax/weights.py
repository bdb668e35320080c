"""PyTorch state dicts <-> NNX state: layout only, because NNX paths are PyTorch keys.

`Linear.weight` is (in, out) here and (out, in) in PyTorch; `Conv2d.weight` is HWIO here and OIHW
there; every other tensor is stored identically. Conversion in both directions is exact.
"""

import os
from collections.abc import Collection, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from esd_jax.errors import UserError
from esd_jax.models.layers import Conv2d, Linear


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def layouts(module: nnx.Module) -> dict[str, type]:
    """Key of every weight whose layout differs from PyTorch's -> its layer class."""
    return {_key((*path, "weight")): type(m) for path, m in nnx.iter_modules(module) if isinstance(m, (Linear, Conv2d))}


def from_torch_layout(kind: type | None, x: np.ndarray) -> np.ndarray:
    if kind is Linear:
        return x.T
    if kind is Conv2d:
        return x.transpose(2, 3, 1, 0)
    return x


def to_torch_layout(kind: type | None, x: np.ndarray) -> np.ndarray:
    if kind is Linear:
        return x.T
    if kind is Conv2d:
        return x.transpose(3, 2, 0, 1)
    return x


def state_dict(module: nnx.Module, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The module's parameters (those named in `keys`, or all) as a PyTorch state dict in numpy."""
    return torch_tensors(nnx.state(module, nnx.Param), layouts(module), keys)


def torch_tensors(
    state: nnx.State, kinds: Mapping[str, type], keys: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """An NNX state of parameters (a module's, or a subset split from it; those named in `keys`, or all)
    as a PyTorch state dict in numpy; `kinds` is `layouts()` of the module it belongs to."""
    # np.require, not np.ascontiguousarray, which makes a 0-d array (CLIP's logit_scale) 1-d.
    return {
        _key(path): np.require(
            to_torch_layout(kinds.get(_key(path)), np.asarray(jax.device_get(v[...]))), requirements="C"
        )
        for path, v in nnx.to_flat_state(state)
        if keys is None or _key(path) in keys
    }


def load_state_dict(module: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str) -> None:
    """Sets every parameter of `module` from a PyTorch state dict, in place.

    Every parameter must be present with the shape the module's config implies, and no tensor may
    be left over: a mismatch is a UserError naming `source` and the key.
    """
    kinds = layouts(module)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    expected = {_key(path): v for path, v in flat}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        raise UserError(
            f"{source}: missing {len(missing)} tensors, first {missing[0]!r}; "
            "is this checkpoint for a different architecture?"
        )
    if unexpected:
        raise UserError(
            f"{source}: {len(unexpected)} unexpected tensors, first {unexpected[0]!r}; "
            "is this checkpoint for a different architecture?"
        )
    for key, var in expected.items():
        value = from_torch_layout(kinds.get(key), np.asarray(tensors[key]))
        if value.shape != var.shape:
            torch_shape = to_torch_layout(kinds.get(key), np.empty(var.shape)).shape
            raise UserError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the config implies {torch_shape}"
            )
        var.set_value(jax.numpy.asarray(value, dtype=var.dtype))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        try:
            return load_file(str(path))
        except TypeError:  # bfloat16 tensors (the official ESD code saves its deltas so): numpy lacks the dtype
            from safetensors.flax import load_file as load_jax

            return {k: np.asarray(v) for k, v in load_jax(str(path)).items()}
    except Exception as e:  # safetensors raises bare exceptions for truncated or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: not a readable safetensors file ({reason}); it is damaged, truncated or another format: "
            "download or save it again"
        ) from None


def write_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    save_file(dict(tensors), str(path), metadata={"format": "pt", **(metadata or {})})
    # safetensors creates the file owner-only; give it the permissions any other new file gets.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
