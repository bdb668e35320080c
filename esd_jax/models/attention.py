"""The one attention function every network calls, so a faster kernel is swapped in here alone."""

import functools

import jax
import jax.numpy as jnp

# Above this many scores per head (Lq * Lk), CPUs take the per-head path: XLA's implementation writes
# all B * H score matrices at once, and on a CPU that round trip through memory, not the arithmetic,
# is the cost (SD's 64x64-latent self-attention: 4096^2 scores per head, 8 heads a sample).
CPU_PER_HEAD_SCORES = 128 * 128
# Above this many scores per head, each head's queries go in blocks of CPU_QUERY_BLOCK rows, so that a
# block's scores stay in the cache too: SD's 64x64-latent self-attention has 4096 x 4096 (64 MB) a head,
# and blocks of 256 rows cut its time by a third to a half on a CPU; at 1024 x 1024 they gain nothing.
CPU_BLOCKED_SCORES = 2**21
CPU_QUERY_BLOCK = 256


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
    xla = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
    cpu = xla if q.shape[1] * k.shape[1] < CPU_PER_HEAD_SCORES else functools.partial(per_head, causal=causal)
    if dtype == jnp.float16:
        # XLA's CPU dot has no float16 x float16 -> float32 kernel; GPUs keep float16.
        cpu = upcast_float16(cpu)
    out = jax.lax.platform_dependent(q, k, v, cpu=cpu, default=xla)
    return out.astype(dtype)


def upcast_float16(fn):
    return lambda *qkv: fn(*(t.astype(jnp.float32) for t in qkv)).astype(jnp.float16)


def per_head(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """The same attention one (sample, head) at a time, so each score matrix stays in the CPU's cache;
    precision as jax.nn.dot_product_attention's: float32 scores and softmax, probabilities in v's dtype."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    rows = CPU_QUERY_BLOCK if lq * lk > CPU_BLOCKED_SCORES and lq % CPU_QUERY_BLOCK == 0 else lq

    def heads(t: jax.Array) -> jax.Array:  # [B, L, H, D] -> [B * H, L, D]
        return t.transpose(0, 2, 1, 3).reshape(b * h, t.shape[1], d)

    def one(qkv):
        qi, ki, vi = qkv  # [Lq, D], [Lk, D], [Lk, D]

        # Rematerialised: the backward recomputes each block's probabilities instead of keeping all B * H
        # heads' from the forward, which is most of an ESD step's working set on a CPU (bit-identical).
        @jax.checkpoint
        def block(args):
            qr, first = args  # [rows, D], the index of its first query
            logits = jnp.einsum("td,sd->ts", qr, ki, preferred_element_type=jnp.float32) * jnp.float32(d**-0.5)
            if causal:
                visible = (first + jnp.arange(rows))[:, None] >= jnp.arange(lk)[None, :]
                logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(vi.dtype)
            return jnp.einsum("ts,sd->td", probs, vi)

        if rows == lq:
            return block((qi, 0))
        return jax.lax.map(block, (qi.reshape(lq // rows, rows, d), jnp.arange(0, lq, rows))).reshape(lq, d)

    out = jax.lax.map(one, (heads(q), heads(k), heads(v)))  # [B * H, Lq, D]
    return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)
