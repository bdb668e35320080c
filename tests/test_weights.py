"""Layout conversion against PyTorch's own layers, and the checks load_state_dict makes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models.layers import Conv2d, GroupNorm, LayerNorm, Linear


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = Conv2d(3, 8, 3, stride=2, padding=1, rngs=rngs)
        self.norm = GroupNorm(4, 8, eps=1e-6)
        self.to_out = nnx.List([Linear(8, 5, rngs=rngs)])
        self.ln = LayerNorm(5)

    def __call__(self, x):  # [B, H, W, C]
        return self.ln(self.to_out[0](self.norm(self.conv(x))))


def torch_net():
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(
        dict(
            conv=torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            norm=torch.nn.GroupNorm(4, 8, eps=1e-6),
            to_out=torch.nn.ModuleList([torch.nn.Linear(8, 5)]),
            ln=torch.nn.LayerNorm(5),
        )
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape))
    return net


def test_layers_match_pytorch_after_conversion():
    ref = torch_net()
    net = Net(nnx.Rngs(0))
    weights.load_state_dict(net, {k: v.numpy() for k, v in ref.state_dict().items()}, source="test")
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    with torch.no_grad():
        h = ref["norm"](ref["conv"](torch.tensor(x))).permute(0, 2, 3, 1)
        want = ref["ln"](ref["to_out"][0](h)).numpy()
    got = np.asarray(net(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_round_trip_is_bit_exact():
    tensors = {k: v.numpy() for k, v in torch_net().state_dict().items()}
    net = Net(nnx.Rngs(1))
    weights.load_state_dict(net, tensors, source="test")
    out = weights.state_dict(net)
    assert out.keys() == tensors.keys()
    assert all(np.array_equal(out[k], tensors[k]) for k in tensors)


def test_mismatches_name_the_key():
    tensors = {k: v.numpy() for k, v in torch_net().state_dict().items()}
    net = Net(nnx.Rngs(1))
    with pytest.raises(UserError, match="missing 1 tensors, first 'ln.bias'"):
        weights.load_state_dict(net, {k: v for k, v in tensors.items() if k != "ln.bias"}, source="f")
    with pytest.raises(UserError, match="1 unexpected tensors, first 'extra'"):
        weights.load_state_dict(net, {**tensors, "extra": np.zeros(1)}, source="f")
    with pytest.raises(UserError, match=r"f: tensor 'to_out.0.weight' has shape \(4, 8\), the config implies \(5, 8\)"):
        weights.load_state_dict(net, {**tensors, "to_out.0.weight": np.zeros((4, 8), np.float32)}, source="f")
