"""The original Stable Diffusion single-file checkpoint: CompVis/LDM and Stability's SGM key names, as
AUTOMATIC1111 and ComfyUI load.

One safetensors file holds every network: the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, SD 1.x/2.x's text encoder under `cond_stage_model.`, SDXL's two under
`conditioner.embedders.0.` (CLIP ViT-L) and `conditioner.embedders.1.` (OpenCLIP ViT-bigG). Conversion
renames keys, joins OpenCLIP's q/k/v and gives the VAE's attention linears the 1x1-conv shape LDM has;
values are copied bit for bit. The block numbering comes from the configs, so any SD 1.x, 2.x or SDXL
shape maps, tiny test ones too.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from esd_jax import weights
from esd_jax.files import atomic_file
from esd_jax.models.clip import CLIPTextConfig
from esd_jax.models.unet import UNetConfig
from esd_jax.models.vae import VAEConfig
from esd_jax.pipeline import StableDiffusion

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# LDM's ResBlock keeps its layers in nn.Sequentials; the missing indices are the SiLUs and the dropout.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# LDM's AttnBlock computes q, k, v and its output projection with 1x1 convs where diffusers has linears.
VAE_CONV_1X1 = re.compile(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def rename(tensors: dict[str, np.ndarray], table: dict[str, str], component: str) -> dict[str, np.ndarray]:
    """Moves each key from the longest diffusers prefix in `table` (whole dotted names) to its LDM prefix."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in table), None)
        if n is None:
            raise KeyError(f"{component} tensor {key!r} has no place in the original Stable Diffusion layout")
        out[".".join([table[".".join(parts[:n])], *parts[n:]])] = value
    return out


def unet_table(config: UNetConfig) -> dict[str, str]:
    """diffusers prefix -> LDM prefix for every layer of the UNet.

    LDM numbers input_blocks and output_blocks consecutively, each holding a resnet, then its attention
    if the level has one; downsamplers take an input block of their own, upsamplers join the level's
    last output block.
    """
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        # SDXL's embedding of the pooled text and the size/crop ids; SGM keeps it where LDM has class labels.
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }

    def resnet(diffusers: str, ldm: str) -> None:
        table.update({f"{diffusers}.{a}": f"{ldm}.{b}" for a, b in UNET_RESNET.items()})

    levels = len(config.block_out_channels)
    layers = config.per_block("layers_per_block")
    k = 1
    for i in range(levels):
        for j in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    for i, kind in enumerate(config.up_block_types):
        # Up blocks run from the lowest resolution, so they take the down levels' layer counts reversed.
        for j in range(layers[levels - 1 - i] + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            k += 1
        if i < levels - 1:
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{k - 1}.{2 if kind == 'CrossAttnUpBlock2D' else 1}"
    return table


def vae_table(config: VAEConfig) -> dict[str, str]:
    """diffusers prefix -> LDM prefix for every layer of the VAE."""
    table = {name: name for name in ("quant_conv", "post_quant_conv")}

    def resnet(diffusers: str, ldm: str) -> None:
        table.update({diffusers: ldm, f"{diffusers}.conv_shortcut": f"{ldm}.nin_shortcut"})

    for part in ("encoder", "decoder"):
        table.update({f"{part}.{name}": f"{part}.{name}" for name in ("conv_in", "conv_out")})
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        table.update({f"{part}.mid_block.attentions.0.{a}": f"{part}.mid.attn_1.{b}" for a, b in VAE_ATTENTION.items()})
    levels = len(config.block_out_channels)
    for i in range(levels):
        for j in range(config.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        table[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        # LDM numbers the decoder's levels by resolution, full resolution first; diffusers in the order they run.
        up = levels - 1 - i
        for j in range(config.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}")
        table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{up}.upsample"
    return table


def vae_layout(tensors: dict[str, np.ndarray], config: VAEConfig) -> dict[str, np.ndarray]:
    """diffusers' AutoencoderKL keys -> LDM's, the mid-block attention linears (out, in) as (out, in, 1, 1) convs."""
    renamed = rename(tensors, vae_table(config), "VAE")
    return {k: v.reshape(*v.shape, 1, 1) if VAE_CONV_1X1.fullmatch(k) else v for k, v in renamed.items()}


def open_clip_layout(tensors: dict[str, np.ndarray], config: CLIPTextConfig) -> dict[str, np.ndarray]:
    """transformers' CLIPTextModel or CLIPTextModelWithProjection keys -> OpenCLIP's, the layout of SD 2.x's
    FrozenOpenCLIPEmbedder and SDXL's FrozenOpenCLIPEmbedder2.

    OpenCLIP ViT-H/14 has 24 blocks, diffusers' SD 2.x text encoder 23: SD 2 conditions on the
    penultimate block's output (then ln_final), so diffusers' converter drops resblocks.23 and the unused
    text_projection (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE). We write the blocks we have: LDM's embedder with
    layer="penultimate" never runs the last block, and LDM, AUTOMATIC1111 and ComfyUI load checkpoints
    non-strictly, so they leave that block as built, unused. SDXL's second encoder keeps every block and
    its projection, which gives the pooled embedding.
    """
    rest = dict(tensors)
    out = {
        "token_embedding.weight": rest.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": rest.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": rest.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": rest.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in rest:
        # OpenCLIP projects with x @ P, P [width, embed]; torch's Linear holds the (embed, width) transpose.
        out["text_projection"] = np.ascontiguousarray(rest.pop("text_projection.weight").T)
    for i in range(config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for param in ("weight", "bias"):
            # torch's nn.MultiheadAttention keeps q, k and v as one (3 * hidden, hidden) projection.
            qkv = [rest.pop(f"{ours}.self_attn.{x}_proj.{param}") for x in "qkv"]
            out[f"{theirs}.attn.in_proj_{param}"] = np.concatenate(qkv)
            for a, b in OPEN_CLIP_LAYER.items():
                out[f"{theirs}.{b}.{param}"] = rest.pop(f"{ours}.{a}.{param}")
    if rest:
        raise KeyError(f"text encoder tensor {next(iter(rest))!r} has no place in OpenCLIP's layout")
    return out


def prefixed(prefix: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` with `prefix` before every key."""
    return {prefix + k: v for k, v in tensors.items()}


def checkpoint_layout(
    tensors: Mapping[str, dict[str, np.ndarray]], configs: Mapping[str, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Each network's diffusers/transformers state dict as one state dict with the original key names.

    `tensors` and `configs` are keyed by network as a pipeline's configs are ("unet", "vae",
    "text_encoder", and "text_encoder_2" for SDXL); each config is the network's config.json.
    """
    unet = rename(tensors["unet"], unet_table(UNetConfig.from_dict(configs["unet"])), "UNet")
    vae = vae_layout(tensors["vae"], VAEConfig.from_dict(configs["vae"]))
    # SD 1.x uses OpenAI's CLIP ViT-L/14 (quick_gelu), which LDM holds as a transformers CLIPTextModel; SD 2.x
    # uses OpenCLIP ViT-H/14 (gelu) in OpenCLIP's own layout, so the activation tells them apart. SDXL's SGM
    # holds one of each: its CLIP ViT-L as SD 1.x does, its OpenCLIP ViT-bigG as SD 2.x does.
    text, text_config = tensors["text_encoder"], CLIPTextConfig.from_dict(configs["text_encoder"])
    if "text_encoder_2" in configs:
        text_2 = open_clip_layout(tensors["text_encoder_2"], CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        text = {**prefixed(SDXL_CLIP_PREFIX, text), **prefixed(SDXL_OPEN_CLIP_PREFIX, text_2)}
    elif text_config.hidden_act == "quick_gelu":
        text = prefixed(CLIP_PREFIX, text)
    else:
        text = prefixed(OPEN_CLIP_PREFIX, open_clip_layout(text, text_config))
    return {**prefixed(UNET_PREFIX, unet), **prefixed(VAE_PREFIX, vae), **text}


def original_layout(pipe: StableDiffusion) -> dict[str, np.ndarray]:
    """Every network of `pipe` as one state dict with the original Stable Diffusion key names."""
    return checkpoint_layout({name: weights.state_dict(getattr(pipe, name)) for name in pipe.networks}, pipe.configs)


def write_single_file(pipe: StableDiffusion, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes `original_layout(pipe)` to a safetensors file; a crash midway leaves any earlier file intact."""
    with atomic_file(Path(path)) as tmp:
        weights.write_safetensors(original_layout(pipe), tmp, metadata)
