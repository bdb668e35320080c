"""The one attention function every network calls, so a faster kernel is swapped in here alone."""

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, upcast: bool = False) -> jax.Array:
    """Softmax attention of q [B, Lq, H, D] over k, v [B, Lk, H, D], scaled by D ** -0.5.

    `upcast` computes in float32 whatever the input dtype (diffusers' upcast_attention, which SD 2.1
    needs in half precision). The result has q's dtype.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    # XLA's implementation on every backend; on GPU "cudnn" (flash attention, half precision only)
    # and on TPU a splash-attention kernel are the drop-in replacements.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return out.astype(dtype)
