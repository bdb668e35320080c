"""The CPU per-head attention path against jax.nn.dot_product_attention (XLA's), values and gradients, and
which kernel each platform gets (the TPU program's Mosaic call is checked in test_plan.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esd_jax.models import attention as attention_module
from esd_jax.models.attention import (
    CPU_BLOCKED_SCORES,
    CPU_PER_HEAD_SCORES,
    CPU_QUERY_BLOCK,
    FORCE_XLA,
    attention,
    implementation,
    per_head,
)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_per_head_attention_equals_xla(causal, dtype, tol):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 136, 3, 8)), dtype) for _ in range(3))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    got = jax.jit(lambda q, k, v: per_head(q, k, v, causal=causal))(q, k, v)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_long_sequences_take_the_per_head_path_with_the_same_gradients():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 160, 2, 8)), jnp.float32) for _ in range(3))
    assert q.shape[1] * k.shape[1] >= CPU_PER_HEAD_SCORES

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(loss(attention), loss(jax.nn.dot_product_attention), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,lk", [(False, 2100), (True, 1536)])
def test_long_heads_in_query_blocks_equal_xla_with_the_same_gradients(causal, lk):
    rng = np.random.default_rng(2)
    lq = 1536
    q = jnp.asarray(rng.standard_normal((1, lq, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, lk, 2, 8)), jnp.float32) for _ in range(2))
    assert lq * lk > CPU_BLOCKED_SCORES and lq % CPU_QUERY_BLOCK == 0

    def grads(attend):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(attend(q, k, v)))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got_loss, got = grads(lambda q, k, v: per_head(q, k, v, causal=causal))
    want_loss, want = grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [40, 160])  # XLA's path, and the per-head one (160^2 > CPU_PER_HEAD_SCORES)
def test_float16_runs_on_cpus_as_float32_rounded(length):
    """XLA's CPU dot has no float16 kernel with float32 accumulation; attention upcasts there."""
    assert (length**2 > CPU_PER_HEAD_SCORES) == (length == 160)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, length, 2, 8)), jnp.float16) for _ in range(3))
    got = jax.jit(attention)(q, k, v)
    want = attention(*(t.astype(jnp.float32) for t in (q, k, v)))
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-3)


def shapes(lq, lk, d, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct((2, lq, 8, d), dtype), jax.ShapeDtypeStruct((2, lk, 8, d), dtype)


@pytest.mark.parametrize(
    "platform, lq, lk, d, dtype, causal, gpu, want",
    [
        # SD 1.4 at 512 px: 64x64-latent self-attention, its cross-attention over 77 tokens, the 8x8 mid-block
        ("tpu", 4096, 4096, 40, jnp.bfloat16, False, False, "pallas-flash"),
        ("tpu", 4096, 4096, 40, jnp.float32, False, False, "pallas-flash"),
        ("tpu", 4096, 77, 40, jnp.bfloat16, False, False, "xla"),
        ("tpu", 64, 64, 160, jnp.bfloat16, False, False, "xla"),
        ("tpu", 77, 77, 64, jnp.bfloat16, True, False, "xla"),  # the text encoder's causal attention
        ("cuda", 4096, 4096, 40, jnp.bfloat16, False, True, "cudnn"),
        ("cuda", 4096, 77, 80, jnp.float16, False, True, "cudnn"),
        ("cuda", 256, 256, 160, jnp.bfloat16, False, True, "xla"),  # SD 1.x's 1280-channel heads
        ("cuda", 4096, 4096, 40, jnp.float32, False, True, "xla"),
        ("cuda", 4096, 4096, 40, jnp.bfloat16, False, False, "xla"),  # a CUDA program lowered on a CPU host
        ("cpu", 4096, 4096, 40, jnp.float32, False, False, "cpu-per-head"),
        ("cpu", 64, 64, 40, jnp.float32, False, False, "xla"),
    ],
)
def test_each_platform_gets_its_kernel(monkeypatch, platform, lq, lk, d, dtype, causal, gpu, want):
    monkeypatch.setattr(attention_module, "cuda_devices", lambda: gpu)
    q, k = shapes(lq, lk, d, dtype)
    assert implementation(platform, q, k, causal=causal) == want
    monkeypatch.setenv(FORCE_XLA, "xla")
    assert implementation(platform, q, k, causal=causal) == "xla"
