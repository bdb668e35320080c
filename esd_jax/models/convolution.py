"""The one convolution every network calls, so a faster kernel is swapped in here alone (as attention.py)."""

import functools

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]

# XLA's CPU convolution is slow when the weights outweigh the activations: SD 1.4's 3x3 convolutions at
# 1280 channels take 31x as long as the same product written as patches @ weights on a 2x2 map, 2.9x
# on 8x8, 1.6x on 16x16 (one CFG pair; docs/benchmarks.md). The rewrite is slower on large maps and
# gains nothing below SD 1.4's 640-channel kernels, so CPUs take it only for kernels of at least that
# many weights on maps of at most as many positions (batch x height x width) as input channels.
CPU_PATCHES_MIN_WEIGHTS = 3 * 3 * 640 * 640
# XLA's TPU compiler turns a one-sample convolution on a large map into code that takes it about a
# minute to generate where the map then flows into a Pallas attention kernel: SD 1.4's first down block
# at batch 1 (the ESD update's) compiles for a v5e in 59 s forward and 62 s backward, and in 5 s and
# 12 s written as patches @ weights, for a third more bytes moved by XLA's count. So a TPU takes the
# rewrite for one sample on maps from SD's 64x64 latents to SDXL's 128x128; the patches hold 9 times
# the map, so larger ones (the VAE decoder's 256x256 and 512x512) keep XLA's convolution.
TPU_PATCHES_POSITIONS = (64 * 64, 128 * 128)


def conv2d(x: jax.Array, w: jax.Array, *, stride: int = 1, padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
    """PyTorch's conv2d on x [B, H, W, Cin] with w [kh, kw, Cin, Cout] (HWIO), no bias."""
    if w.shape[:2] == (1, 1) and stride == 1 and padding == ((0, 0), (0, 0)):
        # The same map as a matrix product, which XLA's TPU compiler generates code for faster than for a
        # convolution, and runs with fewer bytes moved: one SD 1.4 transformer block (two of these) at
        # 64x64 compiles for a v5e in 3.3 s, not 5.2 s, its backward in 6.2 s, not 9.9 s.
        return jnp.dot(x, w[0, 0])
    xla = functools.partial(_xla, stride=stride, padding=padding)
    b, h, wd, ci = x.shape
    (pt, pb), (pl, pr) = padding
    positions = b * ((h + pt + pb - w.shape[0]) // stride + 1) * ((wd + pl + pr - w.shape[1]) // stride + 1)
    patches = functools.partial(patches_matmul, stride=stride, padding=padding)
    kernels = {}
    if w.size >= CPU_PATCHES_MIN_WEIGHTS and positions <= ci:
        kernels["cpu"] = patches
    if b == 1 and TPU_PATCHES_POSITIONS[0] <= positions <= TPU_PATCHES_POSITIONS[1]:
        kernels["tpu"] = patches
    return jax.lax.platform_dependent(x, w, **kernels, default=xla) if kernels else xla(x, w)


def _xla(x: jax.Array, w: jax.Array, *, stride: int, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def patches_matmul(x: jax.Array, w: jax.Array, *, stride: int, padding: Padding) -> jax.Array:
    """The same convolution as one matrix product of the kh * kw shifted (strided) views of x with w."""
    kh, kw, ci, co = w.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    b, h, wd, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    span_h, span_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    views = [
        jax.lax.slice(x, (0, i, j, 0), (b, i + span_h, j + span_w, ci), (1, stride, stride, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(views, axis=-1)  # [B, oh, ow, kh * kw * Cin], in w's (i, j, c) order
    return jnp.dot(patches.reshape(b * oh * ow, kh * kw * ci), w.reshape(kh * kw * ci, co)).reshape(b, oh, ow, co)
