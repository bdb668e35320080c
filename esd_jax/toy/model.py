"""The toy pipeline's architecture: Stable Diffusion's UNet, VAE and CLIP text encoder at tiny sizes.

The sizes follow a first experiment that learnt the world in 45 minutes on 2 CPU cores: a UNet
with block_out_channels (32, 64, 64), one layer per block and cross-attention in the two lower
resolutions; a CLIP text encoder of width 64 and 2 layers over the world's words, one token each; and a
KL autoencoder of widths (16, 32) that halves 32x32 images to 16x16x4 latents (the experiment's fixed
2x2 fold, learnt; narrow, because its encoder runs inside every UNet step).
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats
from transformers import CLIPTokenizer

from esd_jax.models.layers import Embedding
from esd_jax.pipeline import StableDiffusion, new_pipeline
from esd_jax.schedulers import SD1_DDIM_CONFIG as SCHEDULER
from esd_jax.tokenizer import make_clip_tokenizer
from esd_jax.toy import world


@dataclasses.dataclass(frozen=True)
class ToyModel:
    """The sizes of the three networks; the defaults are the shipped model's."""

    vae_channels: tuple[int, ...] = (16, 32)  # one halving: 32x32 images, 16x16x4 latents
    unet_channels: tuple[int, ...] = (32, 64, 64)  # cross-attention in all but the first block
    unet_heads: int = 4  # diffusers' attention_head_dim, which is the number of heads
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 16  # "a yellow triangle, striped" is 7 with BOS and EOS
    groups: int = 8  # GroupNorm groups everywhere

    @property
    def latent_size(self) -> int:
        return world.SIZE // 2 ** (len(self.vae_channels) - 1)


def tokenizer(model: ToyModel) -> CLIPTokenizer:
    return make_clip_tokenizer(world.WORDS, max_length=model.max_tokens)


def unet_config(model: ToyModel) -> dict[str, Any]:
    n = len(model.unet_channels)
    return dict(
        sample_size=model.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=list(model.unet_channels),
        layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        cross_attention_dim=model.text_width,
        attention_head_dim=model.unet_heads,
        norm_num_groups=model.groups,
    )


def vae_config(model: ToyModel, scaling_factor: float) -> dict[str, Any]:
    n = len(model.vae_channels)
    return dict(
        block_out_channels=list(model.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=4,
        norm_num_groups=model.groups,
        layers_per_block=1,
        sample_size=world.SIZE,
        scaling_factor=scaling_factor,
    )


def text_config(model: ToyModel, tok: CLIPTokenizer) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=model.text_width,
        intermediate_size=4 * model.text_width,
        num_hidden_layers=model.text_layers,
        num_attention_heads=4,
        max_position_embeddings=model.max_tokens,
        hidden_act="quick_gelu",
        projection_dim=model.text_width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build(model: ToyModel, seed: int, scaling_factor: float = 1.0) -> StableDiffusion:
    """A randomly initialised toy pipeline; the same seed gives the same weights."""
    tok = tokenizer(model)
    pipe = new_pipeline(
        unet_config(model),
        vae_config(model, scaling_factor),
        text_config(model, tok),
        tok,
        SCHEDULER,
        seed,
        abstract=True,
    )
    init_weights(Networks(pipe), seed)
    return pipe


def init_weights(net: nnx.Module, seed: int) -> None:
    """Draws every parameter with numpy as the layers' own initialisers would (esd_jax.models.layers):
    embeddings N(0, 0.02), norms 1, biases 0, other weights LeCun normal (truncated at 2 sigma, fan-in of
    Linear (in, out) and Conv2d HWIO). Instant, where eager JAX init compiles a program per shape."""
    rng = np.random.default_rng(seed)
    embeddings = {path + ("weight",) for path, m in nnx.iter_graph(net) if isinstance(m, Embedding)}
    values = []
    for path, var in nnx.to_flat_state(nnx.state(net, nnx.Param)):
        shape = var.shape
        if path[-1] == "bias":
            value = np.zeros(shape)
        elif path in embeddings:
            value = rng.normal(0.0, 0.02, shape)
        elif len(shape) == 1:
            value = np.ones(shape)
        else:
            # flax's lecun_normal: the truncated normal rescaled to unit variance, times 1 / sqrt(fan_in).
            draw = stats.truncnorm.rvs(-2.0, 2.0, size=shape, random_state=rng) / 0.87962566103423978
            value = draw / np.sqrt(np.prod(shape[:-1]))
        values.append((path, jnp.asarray(value, jnp.float32)))
    nnx.update(net, nnx.from_flat_state(values))


class Networks(nnx.Module):
    """The pipeline's three networks under one root, so one filter on the first path element picks what trains."""

    def __init__(self, pipe: StableDiffusion):
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.vae = pipe.vae


def set_scaling_factor(pipe: StableDiffusion, scaling_factor: float) -> None:
    """The VAE's config, which its module reads, and the config.json a save writes."""
    pipe.vae.config = dataclasses.replace(pipe.vae.config, scaling_factor=scaling_factor)
    pipe.configs["vae"]["scaling_factor"] = scaling_factor
