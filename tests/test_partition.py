"""Per method, the trained parameters are exactly what the official rules select in diffusers' modules."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import nnx

from conftest import SHAPES
from esd_jax.errors import UserError
from esd_jax.models.unet import UNet2DConditionModel as FlaxUNet
from esd_jax.models.unet import UNetConfig
from esd_jax.partition import METHODS, trainable_keys

# The official rules, written as the reference code writes them, over diffusers' named_modules().
OFFICIAL = {
    "esd-x": lambda name: "attn2" in name,
    "esd-u": lambda name: "attn2" not in name,
    "esd-all": lambda name: True,
    "esd-x-strict": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    "xattn": lambda name: "attn2" in name,
    "selfattn": lambda name: "attn1" in name,
    "full": lambda name: True,
    "noxattn": lambda name: (
        not (name.startswith(("conv_out", "conv_norm_out")) or "attn2" in name or "time_embedding" in name)
    ),
    "notime": lambda name: not (name.startswith(("conv_out", "conv_norm_out")) or "time_embedding" in name),
}


def official_names(model: torch.nn.Module, method: str) -> set[str]:
    return {
        f"{name}.{n}"
        for name, module in model.named_modules()
        if module.__class__.__name__ in ("Linear", "Conv2d") and OFFICIAL[method](name)
        for n, _ in module.named_parameters()
    }


@pytest.fixture(scope="module")
def unets():
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SHAPES["sd1"]["unet"])
    ours = nnx.eval_shape(lambda: FlaxUNet(UNetConfig.from_dict(dict(ref.config)), rngs=nnx.Rngs(0)))
    return ref, ours


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_selects_the_official_parameters(unets, method):
    ref, ours = unets
    assert set(trainable_keys(ours, method)) == official_names(ref, method)


def test_norms_never_train(unets):
    _, ours = unets
    assert not any("norm" in k.split(".")[-2] for k in trainable_keys(ours, "esd-all"))


def test_unknown_method_lists_the_valid_ones(unets):
    with pytest.raises(UserError, match="unknown method 'esd-z'; choose one of esd-x, esd-x-strict"):
        trainable_keys(unets[1], "esd-z")
