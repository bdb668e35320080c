"""What a prompt conditions the UNet with, as one pytree: the keyword arguments of the UNet's call.

SD 1.x and 2.x: {"encoder_hidden_states": [..., L, D]}, the text encoder's last hidden states. SDXL, as
diffusers' StableDiffusionXLPipeline.encode_prompt builds it: the penultimate hidden states of both
encoders joined ([..., L, D1 + D2]), the second encoder's projected pooled state as "text_embeds" and
the six "time_ids" (original size, crop corner, target size) of the image. Rows lead every leaf, so
the code that batches, indexes and repeats prompts does it leaf by leaf and never asks which model it has.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Conditioning = dict[str, jax.Array]


def time_ids(resolution: int) -> np.ndarray:
    """SDXL's [6] time ids of a square image of `resolution` pixels, as diffusers' pipeline makes them by
    default: original size = target size = the image's, crop corner (0, 0)."""
    return np.asarray([resolution, resolution, 0, 0, resolution, resolution], np.float32)


def encode(
    text_encoders: tuple[nnx.Module, ...],
    ids: tuple[jax.Array, ...],
    times: jax.Array | None,
    prefix: jax.Array | None = None,
) -> Conditioning:
    """The conditioning of prompts whose token ids for each text encoder are `ids` ([n, L] each); `times`
    [6] are SDXL's time ids (None for SD 1.x/2.x). `prefix` [n, k, D] (SD 1.x/2.x): token embeddings in
    place of the k after the first, ids made room for by `with_slots`."""
    if len(text_encoders) == 1:
        return {"encoder_hidden_states": text_encoders[0](ids[0], prefix)}
    first, second = text_encoders
    hidden_2, text_embeds = second.penultimate_and_text_embeds(ids[1])
    return {
        "encoder_hidden_states": jnp.concatenate([first.penultimate(ids[0]), hidden_2], axis=-1),
        "text_embeds": text_embeds,
        "time_ids": jnp.broadcast_to(times, (ids[0].shape[0], times.shape[-1])),
    }


def with_slots(ids: np.ndarray, k: int) -> np.ndarray:
    """Token ids [n, L] with k slots after the first token (its copies: `encode`'s prefix replaces them),
    the last k ids dropped: padding, where the prompts leave room for them (slots_fit)."""
    return np.concatenate([ids[:, :1], np.repeat(ids[:, :1], k, axis=1), ids[:, 1 : ids.shape[1] - k]], axis=1)


def slots_fit(ids: np.ndarray, k: int, end_token: int) -> np.ndarray:
    """[n] bool: whether each prompt's ids [n, L] keep their end token (its first) with k slots made."""
    return np.argmax(ids == end_token, axis=1) < ids.shape[1] - k


def zeroed(cond: Conditioning) -> Conditioning:
    """SDXL's unconditional prompt under force_zeros_for_empty_prompt: zero embeddings, the same time ids."""
    return {k: v if k == "time_ids" else jnp.zeros_like(v) for k, v in cond.items()}


def count(cond: Any) -> int:
    """How many prompts `cond` holds."""
    return jax.tree.leaves(cond)[0].shape[0]


def take(cond: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda x: x[index], cond)


def concat(conds: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *conds)


def repeat(one: Any, like: Any) -> Any:
    """`one` prompt's conditioning (no row axis) as many times as `like` has rows."""
    return jax.tree.map(lambda x, y: jnp.broadcast_to(x, y.shape), one, like)


def first(cond: Any) -> Any:
    """Row 0, without its row axis."""
    return jax.tree.map(lambda x: x[0], cond)
