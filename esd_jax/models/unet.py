"""Stable Diffusion's noise-prediction UNet (diffusers' UNet2DConditionModel) in Flax NNX.

Computes what diffusers 0.42 computes for every UNet config of SD 1.4, 1.5, 2-base, 2.1 and SDXL, with
its parameter names (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`, ...). Latents
are NCHW at the API, as in diffusers; everything inside is NHWC. SDXL's UNet also takes diffusers'
added conditioning (`text_embeds`, `time_ids`) as keyword arguments of its call.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.errors import UserError
from esd_jax.models.blocks import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D
from esd_jax.models.layers import Conv2d, Dtype, GroupNorm, Linear

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys whose one supported value is their default (SD 1.x and 2.x leave them there), with a hint
# for the user where one helps.
DEFAULT_ONLY = {
    "mid_block_type": "",
    "only_cross_attention": "",
    "reverse_transformer_layers_per_block": "",
    "encoder_hid_dim": "",
    "encoder_hid_dim_type": "",
    "dual_cross_attention": "",
    "num_attention_heads": "diffusers 0.42 rejects it too; attention_head_dim sets the head count",
    "class_embed_type": "class-conditioned UNets are not supported",
    "num_class_embeds": "class-conditioned UNets are not supported",
    "resnet_time_scale_shift": "",
    "resnet_skip_time_act": "",
    "resnet_out_scale_factor": "",
    "time_embedding_type": "",
    "time_embedding_dim": "",
    "time_embedding_act_fn": "",
    "timestep_post_act": "",
    "time_cond_proj_dim": "LCM-distilled UNets are not supported",
    "conv_in_kernel": "",
    "conv_out_kernel": "",
    "attention_type": "GLIGEN is not supported",
    "class_embeddings_concat": "",
    "mid_block_only_cross_attention": "",
    "cross_attention_norm": "",
    "addition_embed_type_num_heads": "",
}


def _show(value: Any) -> str:
    """A value as its config.json spelling, with Python's None/True/False."""
    return repr(_thaw(value))


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unsupported(key: str, value: Any, supported: str, note: str = "") -> UserError:
    note = f" ({note})" if note else ""
    return UserError(f"unet config: {key}={_show(value)} is not supported{note}; supported: {supported}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel config.json: field names are its keys, defaults diffusers 0.42's."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    # Ignored: SD inference and ESD fine-tuning both run without dropout (every SD config says 0.0).
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: None = None
    encoder_hid_dim: None = None
    encoder_hid_dim_type: None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: None = None
    upcast_attention: bool | None = False  # SDXL's config says null: no upcast
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: None = None
    time_embedding_act_fn: None = None
    timestep_post_act: None = None
    time_cond_proj_dim: None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: None = None
    cross_attention_norm: None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in DEFAULT_ONLY and value != f.default:
                raise _unsupported(f.name, value, _show(f.default), DEFAULT_ONLY[f.name])
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or not set(self.down_block_types) <= set(DOWN_BLOCKS):
            raise _unsupported(
                "down_block_types",
                self.down_block_types,
                f"{n} entries (one per block_out_channels) from {', '.join(DOWN_BLOCKS)}",
            )
        if len(self.up_block_types) != n or not set(self.up_block_types) <= set(UP_BLOCKS):
            raise _unsupported(
                "up_block_types",
                self.up_block_types,
                f"{n} entries (one per block_out_channels) from {', '.join(UP_BLOCKS)}",
            )
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, key)
            if not (_is_int(value) or (isinstance(value, tuple) and len(value) == n and all(map(_is_int, value)))):
                raise _unsupported(key, value, f"an int, or a list of {n} ints (one per block)")
        if not _is_int(self.cross_attention_dim):
            raise _unsupported("cross_attention_dim", self.cross_attention_dim, "one int for every block")
        if self.addition_embed_type not in (None, "text_time"):
            raise _unsupported(
                "addition_embed_type", self.addition_embed_type, "None, or 'text_time' (SDXL)", "SDXL's is text_time"
            )
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not _is_int(getattr(self, key)):
                    raise _unsupported(key, getattr(self, key), "an int, with addition_embed_type 'text_time'")
        if self.act_fn not in ("silu", "swish"):  # diffusers maps both names to SiLU
            raise _unsupported("act_fn", self.act_fn, "'silu'")
        if not _is_int(self.norm_num_groups) or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise _unsupported(
                "norm_num_groups",
                self.norm_num_groups,
                f"an int dividing every block_out_channels {_show(self.block_out_channels)}",
            )

    def per_block(self, key: str) -> tuple[int, ...]:
        """An int-or-list config value as one value per down block."""
        value = getattr(self, key)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """From a diffusers config.json; keys starting with "_" (class name, versions) are bookkeeping."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if not key.startswith("_") and key not in names:
                raise UserError(
                    f"unet config: unknown key {key!r} (diffusers 0.42's UNet2DConditionModel has no "
                    "such option); supported: leave it out"
                )
        return cls(**{k: _freeze(v) for k, v in d.items() if not k.startswith("_")})

    def to_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' UNet2DConditionModel.from_pretrained reads back to the same model."""
        return {
            "_class_name": "UNet2DConditionModel",
            **{f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)},
        }


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding: t [B] -> sinusoids [B, dim] in float32, periods up to 10000."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_features: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def _resnet(config: UNetConfig, in_channels: int, out_channels: int, scale: float = 1.0, **kw) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        4 * config.block_out_channels[0],
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        output_scale_factor=scale,
        **kw,
    )


def _transformer(config: UNetConfig, channels: int, heads: int, num_layers: int, **kw) -> Transformer2DModel:
    return Transformer2DModel(
        channels,
        heads,
        config.cross_attention_dim,
        num_layers=num_layers,
        groups=config.norm_num_groups,
        linear_projection=config.use_linear_projection,
        upcast=config.upcast_attention,
        **kw,
    )


class DownBlock(nnx.Module):
    """diffusers' CrossAttnDownBlock2D, or its DownBlock2D when `heads` is None (no attentions)."""

    def __init__(
        self,
        config: UNetConfig,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        heads: int | None,
        transformer_layers: int,
        add_downsample: bool,
        **kw,
    ):
        self.resnets = nnx.List(
            [_resnet(config, in_channels if j == 0 else out_channels, out_channels, **kw) for j in range(num_layers)]
        )
        self.attentions = nnx.List(
            []
            if heads is None
            else [_transformer(config, out_channels, heads, transformer_layers, **kw) for _ in range(num_layers)]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, config.downsample_padding, **kw)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, config: UNetConfig, channels: int, heads: int, transformer_layers: int, **kw):
        scale = config.mid_block_scale_factor
        self.resnets = nnx.List([_resnet(config, channels, channels, scale, **kw) for _ in range(2)])
        self.attentions = nnx.List([_transformer(config, channels, heads, transformer_layers, **kw)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nnx.Module):
    """diffusers' CrossAttnUpBlock2D, or its UpBlock2D when `heads` is None."""

    def __init__(
        self,
        config: UNetConfig,
        in_channels: int,
        prev_channels: int,
        out_channels: int,
        num_layers: int,
        heads: int | None,
        transformer_layers: int,
        add_upsample: bool,
        **kw,
    ):
        # diffusers' channel bookkeeping: the last resnet's skip comes from the down block below this level.
        self.resnets = nnx.List(
            [
                _resnet(
                    config,
                    (prev_channels if j == 0 else out_channels)
                    + (in_channels if j == num_layers - 1 else out_channels),
                    out_channels,
                    **kw,
                )
                for j in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            []
            if heads is None
            else [_transformer(config, out_channels, heads, transformer_layers, **kw) for _ in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, skips: list[jax.Array]) -> jax.Array:
        # One skip per resnet, the most recent (deepest) first.
        for j, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            x = resnet(jnp.concatenate([x, skip], axis=-1), temb)
            if len(self.attentions):
                x = self.attentions[j](x, context)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNet2DConditionModel(nnx.Module):
    """Down blocks whose every output is kept as a skip, a middle block, up blocks that take the skips back."""

    def __init__(
        self, config: UNetConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        channels, n = config.block_out_channels, len(config.block_out_channels)
        # diffusers' naming quirk: attention_head_dim holds the head count; heads are channels // count wide.
        heads, layers = config.per_block("attention_head_dim"), config.per_block("layers_per_block")
        depth = config.per_block("transformer_layers_per_block")
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(channels[0], 4 * channels[0], **kw)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, 4 * channels[0], **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    config,
                    channels[max(i - 1, 0)],
                    channels[i],
                    layers[i],
                    heads[i] if kind == "CrossAttnDownBlock2D" else None,
                    depth[i],
                    i < n - 1,
                    **kw,
                )
                for i, kind in enumerate(config.down_block_types)
            ]
        )
        self.mid_block = MidBlock(config, channels[-1], heads[-1], depth[-1], **kw)
        rev = channels[::-1]
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    config,
                    rev[min(i + 1, n - 1)],
                    rev[max(i - 1, 0)],
                    rev[i],
                    layers[::-1][i] + 1,
                    heads[::-1][i] if kind == "CrossAttnUpBlock2D" else None,
                    depth[::-1][i],
                    i < n - 1,
                    **kw,
                )
                for i, kind in enumerate(config.up_block_types)
            ]
        )
        self.conv_norm_out = GroupNorm(
            config.norm_num_groups, channels[0], eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1, **kw)

    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array | float,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Noise prediction [B, out, H, W] for `sample` [B, in, H, W] at `timestep` (a scalar or [B]),
        conditioned on `encoder_hidden_states` [B, L, cross_attention_dim]; SDXL's UNet also on the pooled
        `text_embeds` [B, P] and the six `time_ids` [B, 6] (original size, crop corner, target size)."""
        b, _, height, width = sample.shape
        multiple = 2 ** (len(self.down_blocks) - 1)
        if height % multiple or width % multiple:
            raise UserError(
                f"unet: sample resolution {height}x{width} is not supported; supported: height and width "
                f"multiples of {multiple} (the UNet halves them {len(self.down_blocks) - 1} times)"
            )
        config = self.config
        x = sample.transpose(0, 2, 3, 1)
        if config.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep), (-1,)), (b,))
        temb = self.time_embedding(
            timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        )
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise UserError("unet: an SDXL UNet needs text_embeds and time_ids (diffusers' added_cond_kwargs)")
            times = timestep_embedding(
                time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
            )
            added = jnp.concatenate([text_embeds.astype(jnp.float32), times.reshape(b, -1)], axis=-1)
            temb = temb + self.add_embedding(added)
        context = encoder_hidden_states

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, temb, context, skips[-n:])
            skips = skips[:-n]
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return x.transpose(0, 3, 1, 2)
