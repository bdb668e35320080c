"""The one attention function every network calls, and the kernel each platform runs it with.

XLA's implementation everywhere, except: on TPU, self-attention over a multiple of 128 tokens runs
Pallas' flash-attention kernel (jax.experimental.pallas.ops.tpu), which never writes the score matrix
to HBM; on GPU, half-precision attention with a head size cuDNN takes runs cuDNN's flash attention;
on CPU, long attentions go one head at a time (`per_head`). Cross-attention over the 77 prompt tokens
and the text encoder's causal attention stay on XLA: their scores are small.
"""

import functools
import os

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
# The Pallas kernel's blocks of queries and keys: the largest of these that divides the sequence. Its
# backward pass fails below 128 tokens (SD's 8x8 mid-block, 64 tokens, is cheap on XLA anyway).
TPU_BLOCKS = (512, 256, 128)
# ESD_JAX_ATTENTION=xla runs XLA's implementation everywhere (to compare, or to rule a kernel out).
FORCE_XLA = "ESD_JAX_ATTENTION"
# cuDNN's flash attention takes head sizes that are multiples of 8 up to 128 (SD 1.x's 1280-channel
# blocks have 160: XLA's there).
CUDNN_MAX_HEAD = 128


def implementation(platform: str, q: jax.Array, k: jax.Array, *, causal: bool) -> str:
    """The kernel `attention` runs for q [B, Lq, H, D], k [B, Lk, H, D] on `platform`: "xla",
    "cpu-per-head", "pallas-flash" (tpu) or "cudnn" (cuda)."""
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    if os.environ.get(FORCE_XLA) == "xla":
        return "xla"
    if platform == "cpu":
        return "cpu-per-head" if lq * lk >= CPU_PER_HEAD_SCORES else "xla"
    if platform == "tpu" and not causal and lq == lk and lq % TPU_BLOCKS[-1] == 0:
        return "pallas-flash"
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if platform == "cuda" and half and d % 8 == 0 and d <= CUDNN_MAX_HEAD and cuda_devices():
        return "cudnn"
    return "xla"


def cuda_devices() -> bool:
    # cuDNN's attention checks its library when traced, so its branch is only built where GPUs are.
    return any(d.platform == "gpu" for d in jax.devices())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, upcast: bool = False) -> jax.Array:
    """Softmax attention of q [B, Lq, H, D] over k, v [B, Lk, H, D], scaled by D ** -0.5.

    `upcast` computes in float32 whatever the input dtype (diffusers' upcast_attention, which SD 2.1
    needs in half precision). The result has q's dtype.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    kernels = {
        "xla": functools.partial(jax.nn.dot_product_attention, is_causal=causal),
        "cpu-per-head": functools.partial(per_head, causal=causal),
        "pallas-flash": pallas_flash,
        "cudnn": functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn"),
    }
    chosen = {p: kernels[implementation(p, q, k, causal=causal)] for p in ("cpu", "tpu", "cuda")}
    if dtype == jnp.float16:
        # XLA's CPU dot has no float16 x float16 -> float32 kernel; GPUs keep float16.
        chosen["cpu"] = upcast_float16(chosen["cpu"])
    out = jax.lax.platform_dependent(q, k, v, **chosen, default=kernels["xla"])
    return out.astype(dtype)


def pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """TPU flash attention (Pallas, Mosaic) in blocks of the largest of TPU_BLOCKS dividing the sequence."""
    from jax.experimental.pallas.ops.tpu import flash_attention as flash

    length, d = q.shape[1], q.shape[-1]
    block = next(b for b in TPU_BLOCKS if length % b == 0)
    sizes = flash.BlockSizes(
        block_q=block,
        block_k_major=block,
        block_k=block,
        block_b=1,
        block_q_major_dkv=block,
        block_k_major_dkv=block,
        block_k_dkv=block,
        block_q_dkv=block,
        block_k_major_dq=block,
        block_k_dq=block,
        block_q_dq=block,
    )
    heads_first = [t.transpose(0, 2, 1, 3) for t in (q, k, v)]  # the kernel's [B, H, L, D]
    out = flash.flash_attention(*heads_first, sm_scale=d**-0.5, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)


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
