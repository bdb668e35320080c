"""Erasure as a LoRA: low-rank adapters over a frozen, intact UNet, and the files AUTOMATIC1111, ComfyUI and
diffusers load them from.

Each adapted weight W (a Linear's or a Conv's, as the method selects) runs as W + (alpha / r) down @ up:
here down is [in, r] for a Linear and [kh, kw, in, r] for a Conv (HWIO with r as its outputs) and up is
[r, out], so that their product has W's own layout. In PyTorch's layout that is kohya's and PEFT's pair: a
Linear's down [r, in] and up [out, r]; a Conv's down a conv of the layer's kernel [r, in, kh, kw] and up a
1x1 conv [out, r, 1, 1]. Only down and up train; up starts at zero, so the first step starts at the base model.

The files, each {layer path: (down, up, alpha)} in PyTorch's layout (`Factors`):
- kohya (sd-scripts' networks/lora.py, LECO): `lora_unet_<diffusers path, "." -> "_">.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (a 0-d tensor). kohya trains SD 1.x and 2.x on diffusers' UNet, so these
  are its own names; AUTOMATIC1111 and ComfyUI map them onto their UNets (ComfyUI's comfy/lora.py builds
  `lora_unet_` + diffusers key for every weight from its unet_to_diffusers table).
- diffusers (`pipe.load_lora_weights(path)`, PEFT names): `unet.<path>.lora_A.weight` (down) and
  `.lora_B.weight` (up). The file has no alphas, and diffusers then gives every layer lora_alpha = r, a
  scale of 1: alpha / r is folded into lora_B.
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models.layers import Conv2d, value
from esd_jax.parallel import is_variable

KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "unet."
# Folded into the run's key for the adapters' initial values; a step never reaches it (esd.py's streams are
# 2**31 - 1 to - 3, robust.py's - 5).
INIT_STREAM = 2**31 - 4


@dataclasses.dataclass
class Adapters:
    """The trained state of a LoRA run: down and up of each adapted weight, under the weight's own path."""

    down: nnx.State  # [in, r] (Linear) or [kh, kw, in, r] (Conv)
    up: nnx.State  # [r, out]
    scale: float  # alpha / r


jax.tree_util.register_dataclass(Adapters, data_fields=["down", "up"], meta_fields=["scale"])


def init(original: nnx.State, rank: int, alpha: float, seed: int) -> Adapters:
    """Adapters of `rank` for every weight of `original`, as kohya's LoRAModule starts them: down uniform in
    +-1/sqrt(fan_in) (torch's kaiming_uniform_ with a = sqrt(5), PEFT's too), up zero. From (seed, layer)."""
    key = jax.random.fold_in(jax.random.key(seed), INIT_STREAM)
    flat = nnx.to_flat_state(original)

    def down(i, w):
        *kernel, fan_out = w.shape
        bound = 1 / np.sqrt(np.prod(kernel))  # fan_in: in x kh x kw
        layer = jax.random.fold_in(key, i)
        return w.replace(jax.random.uniform(layer, (*kernel, rank), jnp.float32, -bound, bound))

    downs = [(path, down(i, w)) for i, (path, w) in enumerate(flat)]
    ups = [(path, w.replace(jnp.zeros((rank, w.shape[-1]), jnp.float32))) for path, w in flat]
    return Adapters(down=nnx.from_flat_state(downs), up=nnx.from_flat_state(ups), scale=alpha / rank)


def merged(original: nnx.State, adapters: Adapters, strength: float = 1.0) -> nnx.State:
    """`original`'s weights W + strength x scale x down @ up, in float32 (as trained weights are), for the
    model to run: a layer sharded over the mesh (FSDP) is gathered here first."""

    def add(w, down, up):
        delta = jnp.tensordot(down[...], up[...], axes=1)  # W's layout
        sum_ = value(w).astype(jnp.float32) + (strength * adapters.scale) * delta
        # Gathered already: the layer must not gather it again.
        return w.replace(sum_, gather=None) if "gather" in w.get_metadata() else w.replace(sum_)

    return jax.tree.map(add, original, adapters.down, adapters.up, is_leaf=is_variable)


@dataclasses.dataclass(frozen=True)
class Factor:
    """One adapted layer in PyTorch's layout: W + alpha / r x up @ down."""

    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    up: np.ndarray  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...], strength: float = 1.0) -> np.ndarray:
        """strength x alpha / r x up @ down, shaped as the layer's PyTorch weight."""
        product = self.up.reshape(self.up.shape[0], self.rank) @ self.down.reshape(self.rank, -1)
        return (strength * self.alpha / self.rank) * product.reshape(shape)


Factors = dict[str, Factor]  # layer path (a diffusers module name) -> its adapter


def layer(weight_key: str) -> str:
    return weight_key.removesuffix(".weight")


def factors(adapters: Adapters, kinds: Mapping[str, type]) -> Factors:
    """The adapters in PyTorch's layout; `kinds` is weights.layouts() of the UNet."""
    ups = dict(nnx.to_flat_state(adapters.up))
    out = {}
    for path, down in nnx.to_flat_state(adapters.down):
        key = ".".join(str(p) for p in path)
        d, u = (np.asarray(jax.device_get(v[...]), np.float32) for v in (down, ups[path]))
        # Contiguous: safetensors writes an array's buffer, whatever its strides.
        up = np.ascontiguousarray(u.T if kinds[key] is not Conv2d else u.T[:, :, None, None])
        down = np.ascontiguousarray(weights.to_torch_layout(kinds[key], d))
        out[layer(key)] = Factor(down, up, adapters.scale * d.shape[-1])
    return out


def kohya_name(layer_path: str) -> str:
    return KOHYA_PREFIX + layer_path.replace(".", "_")


def kohya_tensors(found: Factors) -> dict[str, np.ndarray]:
    out = {}
    for path, f in found.items():
        name = kohya_name(path)
        out[f"{name}.lora_down.weight"] = f.down
        out[f"{name}.lora_up.weight"] = f.up
        out[f"{name}.alpha"] = np.asarray(f.alpha, np.float32)
    return out


def peft_tensors(found: Factors) -> dict[str, np.ndarray]:
    out = {}
    for path, f in found.items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = f.down
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(f.up * np.float32(f.alpha / f.rank))
    return out


def kohya_metadata(found: Factors) -> dict[str, str]:
    """What sd-scripts writes beside its tensors and tools read to describe a LoRA (all strings)."""
    ranks = {f.rank for f in found.values()}
    alphas = {f.alpha for f in found.values()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": f"{next(iter(alphas)):g}" if len(alphas) == 1 else "per layer",
    }


def is_lora_file(tensors: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(KOHYA_PREFIX) or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)


def read_factors(path: Path, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Factors:
    """The adapters of a kohya or diffusers (PEFT) LoRA file read as `tensors`, for a UNet whose weights
    have the PyTorch `shapes` (state-dict key -> shape); every key must name one of its layers."""
    by_kohya = {kohya_name(layer(k)): layer(k) for k in shapes if k.endswith(".weight")}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, x in tensors.items():
        if key.startswith(KOHYA_PREFIX):
            name, _, part = key.partition(".")
            target = by_kohya.get(name)
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        elif key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")):
            target = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            target = target if f"{target}.weight" in shapes else None
            part = "down" if key.endswith(".lora_A.weight") else "up"
        else:
            raise UserError(f"{path}: {key!r} is neither a kohya (lora_unet_...) nor a diffusers (unet....lora_A) key")
        if target is None or part is None:
            raise UserError(f"{path}: {key!r} names no layer of this UNet; is the LoRA for another model?")
        groups.setdefault(target, {})[part] = np.asarray(x, np.float32)
    found = {}
    for target, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"{path}: layer {target!r} lacks its {'up' if 'down' in parts else 'down'} weight")
        down, up = parts["down"], parts["up"]
        shape = shapes[f"{target}.weight"]
        rank = down.shape[0]
        if down.shape[1:] != (shape[1], *shape[2:]) or up.shape[:2] != (shape[0], rank) or up.size != shape[0] * rank:
            raise UserError(
                f"{path}: layer {target!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not "
                f"make its weight {tuple(shape)}; is the LoRA for another model?"
            )
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # no alpha: a scale of 1
        if not all(np.isfinite(a).all() for a in (down, up, alpha)):
            raise UserError(f"{path}: layer {target!r} holds non-finite values; the erase that wrote it diverged")
        found[target] = Factor(down, up, alpha)
    if not found:
        raise UserError(f"{path}: no LoRA tensors in it")
    return found


def apply_lora(pipe, path: Path, strength: float = 1.0, tensors: Mapping[str, np.ndarray] | None = None) -> None:
    """Merges a kohya or diffusers LoRA file (read as `tensors`, or here) into `pipe.unet` at `strength` (1: as
    trained; -1 undoes it)."""
    tensors = weights.read_safetensors(path) if tensors is None else tensors
    current = weights.state_dict(pipe.unet)
    found = read_factors(path, tensors, {k: v.shape for k, v in current.items()})
    for target, f in found.items():
        w = current[f"{target}.weight"]
        current[f"{target}.weight"] = (w + f.delta(w.shape, strength)).astype(w.dtype)
    weights.load_state_dict(pipe.unet, current, source=str(path))


def low_rank(trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], rank: int) -> tuple[Factors, float]:
    """(adapters of at most `rank`, alpha = their rank) that best approximate trained - base for every weight of
    at least two axes (truncated SVD, per layer), and the relative error ||residual|| / ||trained - base||
    over all of `trained`'s tensors: biases and 1-d weights, which a LoRA cannot carry, count as residual."""
    found, residual, total = {}, 0.0, 0.0
    for key, w in trained.items():
        d = np.asarray(w, np.float64) - np.asarray(base[key], np.float64)
        total += float(np.sum(d * d))
        if not key.endswith(".weight") or d.ndim < 2:
            residual += float(np.sum(d * d))
            continue
        u, s, vt = np.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
        r = min(rank, s.size)
        residual += float(np.sum(s[r:] ** 2))
        root = np.sqrt(s[:r])
        up = (u[:, :r] * root).astype(np.float32)
        down = (root[:, None] * vt[:r]).astype(np.float32).reshape(r, *d.shape[1:])
        found[layer(key)] = Factor(down, up.reshape(d.shape[0], r, *([1] * (d.ndim - 2))), float(r))
    return found, float(np.sqrt(residual / total)) if total else 0.0
