"""The Flax AutoencoderKL against diffusers' on the same random weights, its config and key handling."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import perturb
from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models import vae

SHAPES = {
    # SD's layout in miniature: quant convs and mid-block attention on.
    "two_blocks": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    # Three resolutions, two resnets per block, and every optional piece switched off.
    "three_blocks_bare": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=sorted(SHAPES))
def reference(request):
    """(diffusers model with every parameter perturbed, its state dict as numpy)."""
    from diffusers import AutoencoderKL

    n = len(SHAPES[request.param]["block_out_channels"])
    torch.manual_seed(0)
    ref = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=16,
        **SHAPES[request.param],
    )
    perturb(ref, seed=1)
    return ref, {k: v.numpy() for k, v in ref.state_dict().items()}


def load(ref, tensors) -> vae.AutoencoderKL:
    model = vae.AutoencoderKL(vae.VAEConfig.from_dict(dict(ref.config)), rngs=nnx.Rngs(0))
    weights.load_state_dict(model, tensors, source="test")
    return model


# Jitted once here so that models of one config share a compilation.
encode, decode = nnx.jit(vae.AutoencoderKL.encode), nnx.jit(vae.AutoencoderKL.decode)


def outputs(model: vae.AutoencoderKL, x: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a) for a in (*encode(model, jnp.asarray(x)), decode(model, jnp.asarray(z)))]


def inputs(ref) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    return (
        rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        rng.standard_normal((2, 4, 16 // f, 16 // f)).astype(np.float32),
    )


def test_matches_diffusers(reference):
    ref, tensors = reference
    x, z = inputs(ref)
    with torch.no_grad():
        dist = ref.encode(torch.tensor(x)).latent_dist
        want = [dist.mean.numpy(), dist.logvar.numpy(), ref.decode(torch.tensor(z)).sample.numpy()]
    got = outputs(load(ref, tensors), x, z)
    for name, g, w in zip(("mean", "logvar", "decoded"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert rel_err(g, w) <= 1e-4, name


def test_state_dict_round_trip_is_bit_exact(reference):
    ref, tensors = reference
    out = weights.state_dict(load(ref, tensors))
    assert out.keys() == tensors.keys()
    assert all(out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k]) for k in tensors)


def test_old_attention_names_load_identically():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
        **SHAPES["two_blocks"],
    )
    perturb(ref, seed=2)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    old = {}
    for key, value in tensors.items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new_name}." in key:
                key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
                value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value  # stored as 1x1 convs
        old[key] = value
    assert sum("query" in k or "proj_attn" in k for k in old) == 8  # weight and bias, encoder and decoder
    assert any(v.ndim == 4 and "query" in k for k, v in old.items())

    normalized = vae.normalize_keys(old)
    assert normalized.keys() == tensors.keys()
    x, z = inputs(ref)
    for got, want in zip(outputs(load(ref, normalized), x, z), outputs(load(ref, tensors), x, z), strict=True):
        np.testing.assert_array_equal(got, want)


def test_config_round_trips_through_diffusers():
    from diffusers import AutoencoderKL

    config = vae.VAEConfig(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        scaling_factor=0.13025,
        use_quant_conv=False,
    )
    ref = AutoencoderKL.from_config(config.to_dict())
    assert vae.VAEConfig.from_dict(dict(ref.config)) == config
    assert vae.VAEConfig.from_dict(config.to_dict()) == config
    model = vae.AutoencoderKL(config, rngs=nnx.Rngs(0))
    assert model.scaling_factor == 0.13025
    assert weights.state_dict(model).keys() == ref.state_dict().keys()


def test_reads_an_sd1_config():
    # CompVis/stable-diffusion-v1-4's vae/config.json, written by diffusers 0.2: most keys left at their defaults.
    config = vae.VAEConfig.from_dict(
        {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.2.2",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "out_channels": 3,
            "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        }
    )
    assert config.block_out_channels == (128, 256, 512, 512)
    assert (config.norm_num_groups, config.scaling_factor, config.use_quant_conv) == (32, 0.18215, True)
    hash(config)


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("norm_num_groups", 12),
        ("use_tiling", True),
    ],
)
def test_bad_config_names_the_key(key, value):
    base = {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 8,
    }
    with pytest.raises(UserError, match=key) as e:
        vae.VAEConfig.from_dict({**base, key: value})
    assert "\n" not in str(e.value)
