"""UNet2DConditionModel against PyTorch diffusers: outputs on tiny random UNets, keys and sizes of the real ones."""

import functools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from conftest import SDXL_UNET, SHAPES
from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models.unet import UNet2DConditionModel, UNetConfig
from esd_jax.pipeline import KNOWN_MODELS, KNOWN_ROOT

TINY = {
    # int head count, 1x1-conv projections, a DownBlock2D / UpBlock2D pair: the SD 1.x shape.
    "sd1": SHAPES["sd1"]["unet"],
    # Per-block head counts, linear projections, upcast attention: the SD 2.x shape. It also sets what
    # SD leaves at the default but the code implements (per-block layer counts and depths, padding 0,
    # the timestep embedding's flip and shift, centring, the mid-block scale) so no branch goes untested.
    "sd2": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=(1, 2),
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        center_input_sample=True,
        mid_block_scale_factor=2.0,
    ),
    # No attention in the first block, per-block depths, the added text_time embedding: the SDXL shape.
    "sdxl": SDXL_UNET,
}

# The unet/config.json of CompVis/stable-diffusion-v1-4 (SD 1.5's differs only in bookkeeping keys).
SD14 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stabilityai/stable-diffusion-2-1's, which also spells out several defaults.
SD21 = {
    **SD14,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
    "class_embed_type": None,
}
# stabilityai/stable-diffusion-xl-base-1.0's, as esd-jax carries it for `plan` (it leaves upcast_attention null).
SDXL = json.loads(
    (KNOWN_ROOT / KNOWN_MODELS["stabilityai/stable-diffusion-xl-base-1.0"] / "unet" / "config.json").read_text()
)
# Parameter counts of the released checkpoints.
SIZES = {"sd14": (SD14, 859_520_964), "sd21": (SD21, 865_910_724), "sdxl": (SDXL, 2_567_463_684)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build(config: UNetConfig, tensors: dict, dtype=jnp.float32) -> UNet2DConditionModel:
    model = nnx.eval_shape(lambda: UNet2DConditionModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    weights.load_state_dict(model, tensors, source="test")
    return model


@functools.cache
def reference(name: str) -> tuple[TorchUNet, dict[str, np.ndarray], UNetConfig]:
    """A tiny diffusers UNet with every parameter perturbed, its tensors, and its config."""
    torch.manual_seed(0)
    ref = TorchUNet(**TINY[name])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():  # norms too, so no default init (ones, zeros) hides a mistake
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    return ref, tensors, UNetConfig.from_dict(TINY[name])


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return reference(request.param)


def test_matches_diffusers(tiny):
    ref, tensors, config = tiny
    model = build(config, tensors)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, config.cross_attention_dim)).astype(np.float32)
    added = {}
    if config.addition_embed_type == "text_time":  # pooled embeddings and two images' size/crop/target ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
            "time_ids": np.array([[64, 64, 0, 0, 64, 64], [1024, 768, 32, 16, 896, 640]], np.float32),
        }
    for t in (np.array([0, 500]), 999, 321.5):
        with torch.no_grad():
            want = ref(
                torch.tensor(sample),
                torch.tensor(t) if isinstance(t, np.ndarray) else t,
                torch.tensor(context),
                added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()} or None,
            ).sample.numpy()
        got = model(
            jnp.asarray(sample),
            jnp.asarray(t) if isinstance(t, np.ndarray) else t,
            jnp.asarray(context),
            **{k: jnp.asarray(v) for k, v in added.items()},
        )
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-4, f"timestep {t}"


def test_state_dict_round_trip_is_bit_exact(tiny):
    _, tensors, config = tiny
    out = weights.state_dict(build(config, tensors))
    assert out.keys() == tensors.keys()
    assert all(out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k]) for k in tensors)


def test_config_round_trips_through_diffusers(tiny):
    ref, _, config = tiny
    # diffusers writes every key it knows; all but the shape ones are at their defaults.
    assert UNetConfig.from_dict(dict(ref.config)) == config
    assert UNetConfig.from_dict(config.to_dict()) == config
    saved = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    assert saved.keys() == {k for k in ref.config if not k.startswith("_")}
    with torch.device("meta"):
        rebuilt = TorchUNet.from_config(config.to_dict())
    assert UNetConfig.from_dict(dict(rebuilt.config)) == config


def test_bfloat16_compute_is_close_to_float32():
    ref, tensors, config = reference("sd1")
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():  # diffusers in float32, which the float32 test shows this model equals
        want = ref(torch.tensor(sample), torch.tensor([10, 900]), torch.tensor(context)).sample.numpy()
    # One compiled call: eager bfloat16 would compile every op afresh.
    got = nnx.jit(lambda model, *a: model(*a))(
        build(config, tensors, jnp.bfloat16), jnp.asarray(sample), jnp.array([10, 900]), jnp.asarray(context)
    )
    assert got.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(got).all())
    assert rel_err(got, want) <= 5e-2


# SDXL's is the slowest to build and its blocks are SD's: it runs with the slower tests.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sdxl" else n for n in sorted(SIZES)])
def test_full_size_unet_has_diffusers_keys_and_size(name):
    config_dict, size = SIZES[name]
    model = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(config_dict), rngs=nnx.Rngs(0)))
    shapes = {".".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with torch.device("meta"):
        ref = TorchUNet(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes.keys() == want.keys()
    # Linear and Conv2d weights are stored transposed; the sorted dimensions are layout-free.
    assert all(sorted(shapes[k]) == sorted(want[k]) for k in want)
    assert sum(math.prod(s) for s in shapes.values()) == sum(math.prod(s) for s in want.values()) == size


@pytest.mark.parametrize(
    "change, key",
    [
        ({"addition_embed_type": "text_time"}, "addition_time_embed_dim=None"),
        ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
        ({"cross_attention_dim": [768, 768, 768, 768]}, "cross_attention_dim"),
        ({"attention_head_dim": [8, 8]}, "attention_head_dim"),
        ({"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1], [1, 1]]}, "transformer_layers_per_block"),
        ({"down_block_types": ["AttnDownBlock2D"] * 4}, "down_block_types"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
        ({"norm_num_groups": 24}, "norm_num_groups"),
        ({"rescale_betas": True}, "'rescale_betas'"),
    ],
)
def test_bad_config_names_the_key(change, key):
    with pytest.raises(UserError, match=f"^unet config: .*{key}") as e:
        UNetConfig.from_dict({**SD14, **change})
    assert "\n" not in str(e.value)


def test_resolution_not_a_multiple_of_the_downsampling_is_refused():
    model = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(TINY["sd1"]), rngs=nnx.Rngs(0)))
    with pytest.raises(UserError, match="9x8 .* multiples of 2"):
        model(jnp.zeros((1, 4, 9, 8)), 1, jnp.zeros((1, 7, 32)))
