"""The UNet's layers in Flax NNX: diffusers' ResnetBlock2D, Transformer2DModel and resamplers.

Each class computes what its diffusers namesake computes for the options Stable Diffusion 1.x and
2.x use, with the same attribute names, so NNX paths are diffusers' state-dict keys. Activations are
NHWC. There is no dropout: SD inference and ESD fine-tuning both run without it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.models.attention import attention
from esd_jax.models.layers import Conv2d, Dtype, GroupNorm, LayerNorm, Linear


class ResnetBlock2D(nnx.Module):
    """Two 3x3 convolutions with the projected time embedding added between them, and a residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **kw, rngs=rngs)
        self.time_emb_proj = Linear(temb_channels, out_channels, **kw, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **kw, rngs=rngs)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, **kw, rngs=rngs) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:  # x [B, H, W, C], temb [B, T]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nnx.Module):
    """diffusers' Attention as SD uses it: bias-free q, k, v projections; keys and values from `context`."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int | None = None,
        upcast: bool = False,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.to_q = Linear(query_dim, inner, bias=False, **kw)
        self.to_k = Linear(context_dim, inner, bias=False, **kw)
        self.to_v = Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, **kw)])
        self.heads = heads
        self.upcast = upcast

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:  # x [B, L, C], context [B, S, D]
        context = x if context is None else context
        b, n = x.shape[:2]
        q = self.to_q(x).reshape(b, n, self.heads, -1)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1)
        out = attention(q, k, v, upcast=self.upcast)  # [B, L, H, D]
        return self.to_out[0](out.reshape(b, n, -1))


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)  # PyTorch's F.gelu is the exact (erf) form


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # diffusers' net is [GEGLU, Dropout, Linear]; the dropout holds no weights, hence no key "1".
        self.net = nnx.Dict({"0": GEGLU(dim, mult * dim, **kw), "2": Linear(mult * dim, dim, **kw)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention over the text, feed-forward: each pre-normalised and residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        *,
        upcast: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast, **kw, rngs=rngs)
        self.norm2 = LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast, **kw, rngs=rngs)
        self.norm3 = LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, **kw, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # x [B, L, C], context [B, S, D]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Pixels as tokens through `num_layers` transformer blocks, added back to the input."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        *,
        num_layers: int,
        groups: int,
        linear_projection: bool,
        upcast: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        head_dim = channels // heads
        inner = heads * head_dim
        # On NHWC a 1x1 convolution (SD 1.x) and a Linear (SD 2.x) are the same map; only the stored layout differs.
        proj = (lambda i, o: Linear(i, o, **kw)) if linear_projection else (lambda i, o: Conv2d(i, o, 1, **kw))
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, param_dtype=param_dtype)  # not norm_eps
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast=upcast, **kw) for _ in range(num_layers)]
        )
        self.proj_out = proj(inner, channels)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # x [B, H, W, C], context [B, S, D]
        b, h, w, _ = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[-1]
        tokens = tokens.reshape(b, h * w, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, inner))


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, padding: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        # diffusers pads only bottom and right when asked for no padding; SD's downsample_padding 1 pads all sides.
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = Conv2d(
            channels, channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
