"""The original Stable Diffusion single file, read back by diffusers' own single-file converters and loader."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.numpy import load_file

import esd_jax
from esd_jax import single_file, weights
from esd_jax.errors import UserError
from esd_jax.models.unet import UNetConfig
from esd_jax.models.vae import VAEConfig
from esd_jax.pipeline import KNOWN_MODELS, KNOWN_ROOT, NETWORKS

PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
SDXL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, as esd-jax carries it.
SDXL_BASE_UNET = json.loads(
    (KNOWN_ROOT / KNOWN_MODELS["stabilityai/stable-diffusion-xl-base-1.0"] / "unet" / "config.json").read_text()
)


@pytest.fixture(scope="module")
def converted(tiny_pipeline):
    """(our single-file dict as torch tensors, the PyTorch reference pipeline, the loaded esd-jax pipeline)."""
    folder, ref = tiny_pipeline
    pipe = esd_jax.load_pipeline(folder)
    checkpoint = {k: torch.tensor(v) for k, v in single_file.original_layout(pipe).items()}
    return checkpoint, ref, pipe


def assert_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def with_text_model_prefix(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without `text_model.`; LDM checkpoints and diffusers' converters use it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def test_keys_sit_under_the_three_ldm_prefixes(converted):
    checkpoint, ref, _ = converted
    assert all(k.startswith(PREFIXES) for k in checkpoint)
    text = ref.text_encoder.config
    open_clip = text.hidden_act == "gelu"
    # OpenCLIP joins each layer's q, k and v weights and biases: six tensors become two.
    counts = (len(ref.unet.state_dict()), len(ref.vae.state_dict()), len(ref.text_encoder.state_dict()))
    counts = (*counts[:2], counts[2] - 4 * text.num_hidden_layers * open_clip)
    for prefix, count in zip(PREFIXES, counts, strict=True):
        assert sum(k.startswith(prefix) for k in checkpoint) == count, prefix
    assert sfu.is_open_clip_model(checkpoint) == open_clip and sfu.is_clip_model(checkpoint) != open_clip
    if open_clip:
        in_proj = checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert in_proj.shape == (3 * text.hidden_size, text.hidden_size)
    # Two things diffusers' converters accept either way, so checked here. LDM's VAE attention is 1x1 convs:
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert checkpoint[f"first_stage_model.{part}.mid.attn_1.{name}.weight"].ndim == 4
    # and LDM's upsampler follows its output block's last layer: the resnet, then the attention if any.
    upsamplers = [k.split(".")[3:5] for k in checkpoint if k.endswith(".conv.weight") and ".output_blocks." in k]
    assert upsamplers
    for block, index in upsamplers:
        attention = f"model.diffusion_model.output_blocks.{block}.1.norm.weight" in checkpoint
        assert index == ("2" if attention else "1")


def test_unet_round_trips_through_diffusers_converter(converted):
    checkpoint, ref, _ = converted
    got = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(ref.unet.config))
    assert_identical(got, ref.unet.state_dict())


def test_vae_round_trips_through_diffusers_converter(converted):
    checkpoint, ref, _ = converted
    got = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(ref.vae.config))
    assert_identical(got, ref.vae.state_dict())


def test_text_encoder_round_trips_through_diffusers_converter(converted):
    checkpoint, ref, _ = converted
    if ref.text_encoder.config.hidden_act == "quick_gelu":
        got = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        got = sfu.convert_open_clip_checkpoint(ref.text_encoder, checkpoint)
    assert_identical(got, with_text_model_prefix(ref.text_encoder.state_dict()))


def test_written_file_loads_with_safetensors_and_diffusers(converted, tmp_path):
    checkpoint, ref, pipe = converted
    path = tmp_path / "out" / "model.safetensors"
    single_file.write_single_file(pipe, path)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt"}
    assert_identical({k: torch.tensor(v) for k, v in load_file(path).items()}, checkpoint)

    # A weightless copy of the folder gives diffusers the configs, so every weight must come from the file.
    configs = tmp_path / "configs"
    shutil.copytree(pipe.source, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(configs), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_identical(getattr(loaded, name).state_dict(), getattr(ref, name).state_dict())


def test_failed_write_keeps_the_earlier_file(converted, tmp_path, monkeypatch):
    _, _, pipe = converted
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"earlier")

    def crash(tensors, tmp, metadata=None):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(single_file.weights, "write_safetensors", crash)
    with pytest.raises(OSError):
        single_file.write_single_file(pipe, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and path.read_bytes() == b"earlier"
    with pytest.raises(UserError, match="is a folder"):
        single_file.write_single_file(pipe, tmp_path)


@pytest.mark.parametrize(
    "unet_config, model_type",
    [
        ({}, "v1"),  # diffusers' defaults are SD 1.x's UNet
        (dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True), "v2"),
    ],
)
def test_full_size_key_maps_match_diffusers_converters(unet_config, model_type):
    """SD's own sizes (two layers per block, four levels) on the meta device: names and shapes, no weights."""
    vae_config = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    checkpoint = {
        **{
            f"model.diffusion_model.{k}": v
            for k, v in single_file.rename(
                unet_state, single_file.unet_table(UNetConfig.from_dict(dict(unet.config))), "UNet"
            ).items()
        },
        **{
            f"first_stage_model.{k}": v
            for k, v in single_file.vae_layout(vae_state, VAEConfig.from_dict(dict(vae.config))).items()
        },
    }
    # The key diffusers (and so from_single_file) reads to tell SD 1.x from 2.x.
    assert sfu.infer_diffusers_model_type(checkpoint) == model_type
    # SD's own upsampler places, from diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py.
    upsamplers = {k for k in checkpoint if k.startswith("model.diffusion_model.output_blocks.") and ".conv." in k}
    assert upsamplers == {
        f"model.diffusion_model.output_blocks.{b}.conv.{p}" for b in ("2.1", "5.2", "8.2") for p in ("weight", "bias")
    }
    for got, want in (
        (sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), unet_state),
        (sfu.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), vae_state),
    ):
        assert sorted(got) == sorted(want)
        assert all(got[k].shape == want[k].shape for k in want)
    assert checkpoint["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def test_sdxl_file_loads_with_diffusers(sdxl_pipeline, tmp_path):
    """The tiny SDXL's torch weights, converted as esd-jax's own would be, read back by from_single_file."""
    folder, ref = sdxl_pipeline
    names = NETWORKS["StableDiffusionXLPipeline"]
    tensors = {name: {k: v.numpy() for k, v in getattr(ref, name).state_dict().items()} for name in names}
    # esd-jax's CLIPTextModel, like every SD checkpoint, keeps the `text_model.` prefix transformers 5 drops.
    tensors["text_encoder"] = with_text_model_prefix(tensors["text_encoder"])
    configs = {name: json.loads((folder / name / "config.json").read_text()) for name in names}
    checkpoint = single_file.checkpoint_layout(tensors, configs)

    assert all(k.startswith(SDXL_PREFIXES) for k in checkpoint)
    added = tensors["unet"]["add_embedding.linear_1.weight"]
    assert np.array_equal(checkpoint["model.diffusion_model.label_emb.0.0.weight"], added)
    # OpenCLIP's projection is [width, embed], applied as x @ P.
    projection = tensors["text_encoder_2"]["text_projection.weight"]
    assert np.array_equal(checkpoint["conditioner.embedders.1.model.text_projection"], projection.T)
    # The second encoder's last block is written too: SD 2.x never runs its last block, SDXL's pooled output does.
    in_proj = checkpoint["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert in_proj.shape == (3 * 48, 48)
    assert sfu.is_clip_sdxl_model(checkpoint) and sfu.is_open_clip_sdxl_model(checkpoint)

    path = tmp_path / "sdxl.safetensors"
    weights.write_safetensors(checkpoint, path)
    # The folder's configs say what each network is, which the tiny file's keys could not: diffusers
    # detects SDXL by conditioner.embedders.1's tenth block (infer_diffusers_model_type).
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in names:
        assert_identical(getattr(loaded, name).state_dict(), getattr(ref, name).state_dict())


def test_full_size_sdxl_unet_key_map_matches_diffusers_converter():
    """SDXL base's UNet on the meta device: names and shapes through diffusers' converter, no weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET)
    state = unet.state_dict()
    table = single_file.unet_table(UNetConfig.from_dict(dict(unet.config)))
    checkpoint = single_file.prefixed(single_file.UNET_PREFIX, single_file.rename(state, table, "UNet"))
    # SGM's places: upsamplers after the two attention levels' last output blocks, each block's resnet then attention.
    upsamplers = {k for k in checkpoint if k.startswith("model.diffusion_model.output_blocks.") and ".conv." in k}
    assert upsamplers == {
        f"model.diffusion_model.output_blocks.{b}.conv.{p}" for b in ("2.2", "5.2") for p in ("weight", "bias")
    }
    # diffusers' converter finds label_emb and every attention's transformer blocks where SGM keeps them.
    got = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert sorted(got) == sorted(state)
    assert all(got[k].shape == state[k].shape for k in state)
