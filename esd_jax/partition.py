"""Which UNet weights an ESD method trains, as one NNX filter.

Only the weights and biases of Linear and Conv layers are eligible (norm layers never train); the
method picks among them by the layer's path, which is its diffusers key. The official diffusers code
(esd_sd.py) names the first four; the paper's CompVis code names the rest, translated here from
CompVis paths (`out.` -> conv_norm_out/conv_out, `time_embed` -> time_embedding; SDXL's `label_emb`,
its other embedding of the conditioning, -> add_embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from esd_jax.errors import UserError

if TYPE_CHECKING:
    from flax import nnx

COMPVIS_OUTPUT = ("conv_norm_out", "conv_out", "time_embedding", "add_embedding")

METHODS: dict[str, tuple[Callable[[str], bool], str]] = {
    "esd-x": (lambda layer: "attn2" in layer, "cross-attention layers (attn2)"),
    "esd-x-strict": (
        lambda layer: "attn2.to_k" in layer or "attn2.to_v" in layer,
        "cross-attention key and value projections (attn2.to_k, attn2.to_v)",
    ),
    "esd-u": (lambda layer: "attn2" not in layer, "every layer but cross-attention"),
    "esd-all": (lambda layer: True, "every layer"),
    "xattn": (lambda layer: "attn2" in layer, "CompVis name of esd-x"),
    "noxattn": (
        lambda layer: "attn2" not in layer and not layer.startswith(COMPVIS_OUTPUT),
        "every layer but cross-attention, the time embedding and the output conv",
    ),
    "selfattn": (lambda layer: "attn1" in layer, "self-attention layers (attn1)"),
    "full": (lambda layer: True, "CompVis name of esd-all"),
    "notime": (
        lambda layer: not layer.startswith(COMPVIS_OUTPUT),
        "every layer but the time embedding and the output conv",
    ),
}


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def trainable_keys(unet: nnx.Module, method: str) -> frozenset[str]:
    """The state-dict keys of the parameters `method` trains."""
    # Imported here so that esd_jax.config, which checks method names, loads without Flax.
    from flax import nnx

    from esd_jax.models.layers import Conv2d, Linear

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    rule = METHODS[method][0]
    keys = frozenset(
        _path_key((*path, name))
        for path, module in nnx.iter_modules(unet)
        if isinstance(module, (Linear, Conv2d)) and rule(_path_key(path))
        for name in ("weight", "bias")
        if getattr(module, name) is not None
    )
    if not keys:
        raise UserError(f"method {method!r} selects no parameter of this UNet")
    return keys


def trainable_filter(unet: nnx.Module, method: str) -> Callable[[tuple, object], bool]:
    """The NNX filter (path, variable) -> bool that selects `method`'s parameters."""
    keys = trainable_keys(unet, method)
    return lambda path, _: _path_key(path) in keys


def adapted_filter(unet: nnx.Module, method: str) -> Callable[[tuple, object], bool]:
    """The NNX filter of the weights a LoRA run adapts: those of `method`'s layers, not their biases."""
    keys = {k for k in trainable_keys(unet, method) if k.endswith(".weight")}
    return lambda path, _: _path_key(path) in keys


def split_for_erase(unet: nnx.Module, method: str, lora_rank: int = 0, lora_alpha: float = 1.0, seed: int = 0):
    """(graphdef, trainable, original, frozen) of an erase run: `trainable` what the optimizer trains,
    `original` the frozen values of the trained layers' weights, `frozen` the rest of the UNet.

    Full weights (lora_rank 0): trainable and original are the same selected parameters (the caller copies
    them, since the step donates the trainable ones). LoRA: original is the selected layers' weights as they
    are, split off the UNet rather than copied, and trainable their lora.Adapters."""
    from flax import nnx

    from esd_jax import lora

    if not lora_rank:
        graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, method), ...)
        return graphdef, trainable, trainable, frozen
    graphdef, original, frozen = nnx.split(unet, adapted_filter(unet, method), ...)
    return graphdef, lora.init(original, lora_rank, lora_alpha, seed), original, frozen
