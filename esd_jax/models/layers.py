"""Parameter-holding layers whose attribute names are PyTorch's.

A parameter's path in the NNX state, joined with dots, is its PyTorch state-dict key
(`...attn2.to_k.weight`), so checkpoint conversion is layout only: `Linear.weight` is stored
(in, out) and `Conv2d.weight` HWIO, the transposes of PyTorch's (out, in) and OIHW.

Activations are NHWC. Every layer takes `dtype`, the compute dtype: parameters keep their own
dtype (float32 by default) and are cast at use; normalisations always compute in float32. A parameter
sharded over the mesh (esd_jax.parallel.gathered_where_used) is gathered where it is used.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.convolution import conv2d

Dtype = jnp.dtype | type
AXIS = "data"  # the device mesh's one axis (esd_jax.parallel)


def value(param: nnx.Param) -> jax.Array:
    """The parameter's array, gathered from the mesh's devices here, at its use, if it is sharded (FSDP)."""
    axis = param.get_metadata().get("gather")
    x = param[...]
    return x if axis is None else jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)


class Linear(nnx.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.weight = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), value(self.weight).astype(self.dtype))
        if self.bias is not None:
            y = y + value(self.bias).astype(self.dtype)
        return y


class Conv2d(nnx.Module):
    """PyTorch's Conv2d on NHWC input; `padding` is symmetric unless given as ((top, bottom), (left, right))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
        bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if bias else None
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        y = conv2d(
            x.astype(self.dtype), value(self.weight).astype(self.dtype), stride=self.stride, padding=self.padding
        )
        if self.bias is not None:
            y = y + value(self.bias).astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.weight = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, ..., C]
        # A fusion boundary. Without it XLA's TPU compiler fuses these statistics into the convolution that
        # made x, and generating code for such a fusion takes it about 10 s at SD's 64x64 latents: SD 1.4's
        # UNet forward compiles for a v5e in 92 s instead of 132 s, and reads and writes 17.6 GB, not 19.1.
        x = jax.lax.optimization_barrier(x)
        shape = x.shape
        g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        y = g.reshape(shape) * value(self.weight).astype(jnp.float32) + value(self.bias).astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * value(self.weight).astype(jnp.float32) + value(self.bias).astype(jnp.float32)
        return y.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_embeddings, dim), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(value(self.weight), ids, axis=0).astype(self.dtype)
