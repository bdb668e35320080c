"""The CPU patches-times-weights convolution against PyTorch's conv2d and XLA's, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from esd_jax.models.convolution import CPU_PATCHES_MIN_WEIGHTS, conv2d, patches_matmul


def torch_conv(x: np.ndarray, w: np.ndarray, stride: int, padding) -> np.ndarray:
    (pt, pb), (pl, pr) = padding
    xt = torch.nn.functional.pad(torch.tensor(x).permute(0, 3, 1, 2), (pl, pr, pt, pb))
    y = torch.nn.functional.conv2d(xt, torch.tensor(w).permute(3, 2, 0, 1), stride=stride)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "shape,kernel,stride,padding",
    [
        ((2, 6, 5, 8), 3, 1, ((1, 1), (1, 1))),  # a UNet/VAE 3x3
        ((2, 7, 6, 8), 3, 2, ((1, 1), (1, 1))),  # the UNet's downsampler
        ((1, 7, 8, 4), 3, 2, ((0, 1), (0, 1))),  # the VAE's asymmetric downsampler
        ((3, 4, 4, 8), 1, 1, ((0, 0), (0, 0))),  # a 1x1 shortcut
    ],
)
def test_patches_matmul_equals_torch_conv2d(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    w = rng.standard_normal((kernel, kernel, shape[-1], 5), np.float32)
    got = jax.jit(lambda x, w: patches_matmul(x, w, stride=stride, padding=padding))(x, w)
    np.testing.assert_allclose(np.asarray(got), torch_conv(x, w, stride, padding), atol=1e-5, rtol=1e-5)


def test_big_kernels_on_small_maps_take_the_patches_path_with_the_same_values_and_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 2, 640)), jnp.float32)  # 4 positions, 640 channels in
    w = jnp.asarray(rng.standard_normal((3, 3, 640, 640)) / 48, jnp.float32)
    assert w.size >= CPU_PATCHES_MIN_WEIGHTS
    padding = ((1, 1), (1, 1))
    fn = jax.jit(lambda x, w: conv2d(x, w, stride=1, padding=padding))
    assert "convolution(" not in fn.lower(x, w).compile().as_text()
    np.testing.assert_allclose(np.asarray(fn(x, w)), torch_conv(np.asarray(x), np.asarray(w), 1, padding), atol=2e-4)

    def grads(conv):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))(x, w)

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    for got, want in zip(grads(lambda x, w: conv2d(x, w, padding=padding)), grads(xla), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-4)


def test_large_maps_keep_xla_convolution():
    x = jnp.zeros((1, 32, 32, 640), jnp.float32)  # 1024 positions > 640 channels in
    w = jnp.zeros((3, 3, 640, 640), jnp.float32)
    fn = jax.jit(lambda x, w: conv2d(x, w, padding=((1, 1), (1, 1))))
    assert "convolution(" in fn.lower(x, w).compile().as_text()


def test_a_1x1_convolution_is_a_matrix_product_equal_to_torch_conv2d():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 6, 8), np.float32)
    w = rng.standard_normal((1, 1, 8, 12), np.float32)
    fn = jax.jit(lambda x, w: conv2d(x, w))
    assert "convolution(" not in fn.lower(x, w).as_text()
    np.testing.assert_allclose(np.asarray(fn(x, w)), torch_conv(x, w, 1, ((0, 0), (0, 0))), atol=1e-5, rtol=1e-5)


def lowered_for(platform: str, fn, *args) -> str:
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def test_tpus_take_patches_for_one_sample_on_a_large_map_only():
    w = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.bfloat16)
    padding = ((1, 1), (1, 1))

    def conv(x, w):
        return conv2d(x, w, padding=padding)

    one = jax.ShapeDtypeStruct((1, 64, 64, 8), jnp.bfloat16)
    assert "stablehlo.convolution" not in lowered_for("tpu", conv, one, w)
    assert "stablehlo.convolution" in lowered_for("cpu", conv, one, w)
    for other in ((2, 64, 64, 8), (1, 32, 32, 8), (1, 256, 256, 8)):
        assert "stablehlo.convolution" in lowered_for("tpu", conv, jax.ShapeDtypeStruct(other, jnp.bfloat16), w)
