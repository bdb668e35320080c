"""Stable Diffusion's KL autoencoder (diffusers' AutoencoderKL) in Flax NNX.

Computes what diffusers 0.42 computes, with its parameter names: `encode` gives the latent
Gaussian's mean and clamped log-variance, `decode` maps latents back to images. Images and
latents are NCHW at the API, as in diffusers; everything inside is NHWC.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.errors import UserError
from esd_jax.models.attention import attention
from esd_jax.models.blocks import Downsample2D, Upsample2D
from esd_jax.models.layers import Conv2d, Dtype, GroupNorm, Linear

# Every normalisation in diffusers' Encoder and Decoder uses this epsilon, not GroupNorm's 1e-5.
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL config.json, restricted to what SD 1.x and 2.x use; defaults are diffusers'."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: None = None
    latents_mean: None = None
    latents_std: None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise UserError(
                f"VAE config key 'down_block_types' is {list(self.down_block_types)}; supported: "
                f"one 'DownEncoderBlock2D' per entry of block_out_channels ({n})"
            )
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise UserError(
                f"VAE config key 'up_block_types' is {list(self.up_block_types)}; supported: "
                f"one 'UpDecoderBlock2D' per entry of block_out_channels ({n})"
            )
        if self.act_fn not in ("silu", "swish"):  # diffusers maps both names to SiLU
            raise UserError(f"VAE config key 'act_fn' is {self.act_fn!r}; supported: 'silu'")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if getattr(self, key) is not None:
                raise UserError(f"VAE config key {key!r} is {getattr(self, key)!r}; supported: null (SD 1.x/2.x)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise UserError(
                f"VAE config key 'block_out_channels' {list(self.block_out_channels)} must be "
                f"multiples of norm_num_groups ({self.norm_num_groups})"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """From a diffusers config.json; keys starting with "_" (class name, versions) are bookkeeping."""
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key not in names:
                raise UserError(f"VAE config key {key!r} is not supported; supported keys: {', '.join(names)}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' AutoencoderKL.from_pretrained reads back to the same model."""
        fields = dataclasses.asdict(self)
        return {
            "_class_name": "AutoencoderKL",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        }


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without the time embedding, which the VAE does not have."""

    def __init__(
        self, in_channels: int, out_channels: int, groups: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_channels, eps=EPS, **kw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **kw, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, eps=EPS, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **kw, rngs=rngs)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, **kw, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialAttention(nnx.Module):
    """One head attending over all pixels, the whole channel vector as its head (diffusers' Attention)."""

    def __init__(self, channels: int, groups: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(groups, channels, eps=EPS, **kw)
        self.to_q = Linear(channels, channels, **kw, rngs=rngs)
        self.to_k = Linear(channels, channels, **kw, rngs=rngs)
        self.to_v = Linear(channels, channels, **kw, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, **kw, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, 1, c)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D: resnet, attention (unless switched off), resnet."""

    def __init__(
        self, channels: int, groups: int, add_attention: bool, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(channels, groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class ResnetStack(nnx.Module):
    """`num_layers` resnets, the first taking `in_channels`; the shared body of the encoder and decoder blocks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups, **kw)
                for j in range(num_layers)
            ]
        )

    def run_resnets(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class DownBlock(ResnetStack):
    """diffusers' DownEncoderBlock2D."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(in_channels, out_channels, num_layers, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.downsamplers = nnx.List([Downsample2D(out_channels, 0, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.run_resnets(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(ResnetStack):
    """diffusers' UpDecoderBlock2D."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(in_channels, out_channels, num_layers, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.run_resnets(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **kw, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    channels[max(i - 1, 0)],
                    out,
                    config.layers_per_block,
                    groups,
                    i < len(channels) - 1,
                    **kw,
                    rngs=rngs,
                )
                for i, out in enumerate(channels)
            ]
        )
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention, **kw, rngs=rngs)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, **kw)
        # Twice the latent channels: the mean and the log-variance.
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, **kw, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1, **kw, rngs=rngs)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention, **kw, rngs=rngs)
        # One resnet more per block than the encoder has, as in diffusers' Decoder.
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    channels[max(i - 1, 0)],
                    out,
                    config.layers_per_block + 1,
                    groups,
                    i < len(channels) - 1,
                    **kw,
                    rngs=rngs,
                )
                for i, out in enumerate(channels)
            ]
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, **kw)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1, **kw, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:  # [B, h, w, latent]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(
        self, config: VAEConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        c = config.latent_channels
        self.quant_conv = Conv2d(2 * c, 2 * c, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1, **kw) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, C, H, W] -> (mean, logvar), each [B, latent, H / f, W / f], before `scaling_factor`."""
        moments = self.encoder(images.transpose(0, 2, 3, 1))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.transpose(0, 3, 1, 2), 2, axis=1)
        # diffusers' DiagonalGaussianDistribution clamps so that exp(logvar) neither underflows nor overflows.
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents [B, latent, h, w] (already divided by `scaling_factor`) -> images [B, C, H, W]."""
        z = latents.transpose(0, 2, 3, 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).transpose(0, 3, 1, 2)


# The mid-block attention's names before diffusers 0.14, still found in many checkpoints.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_LINEARS = (*_OLD_ATTENTION_NAMES, "to_q", "to_k", "to_v", "to_out")


def normalize_keys(tensors: dict) -> dict:
    """Renames old mid-block attention tensors to diffusers' current names and squeezes 1x1-conv weights."""
    out = {}
    for key, value in tensors.items():
        prefix, found, rest = key.partition("mid_block.attentions.0.")
        name, _, param = rest.partition(".")
        if found and name in _ATTENTION_LINEARS:
            key = f"{prefix}{found}{_OLD_ATTENTION_NAMES.get(name, name)}.{param}"
            # Checkpoints converted from the original LDM code keep these linears as (O, I, 1, 1) convs.
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value.reshape(value.shape[:2])
        out[key] = value
    return out
