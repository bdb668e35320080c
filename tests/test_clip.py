"""The Flax CLIPTextModel against transformers' on the same random weights, its config and key handling."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from conftest import perturb
from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models import clip

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=32,
    bos_token_id=98,
    eos_token_id=99,
    pad_token_id=1,
)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def reference(request, tmp_path_factory):
    """(transformers model with every parameter perturbed, the folder its save_pretrained wrote)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(hidden_act=request.param, **TINY)).eval()
    perturb(ref, seed=3)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, folder


def load(config: clip.CLIPTextConfig, tensors: dict) -> clip.CLIPTextModel:
    model = clip.CLIPTextModel(config, rngs=nnx.Rngs(0))
    weights.load_state_dict(model, clip.normalize_keys(tensors), source="test")
    return model


def from_folder(folder) -> clip.CLIPTextModel:
    config = clip.CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return load(config, load_file(folder / "model.safetensors"))


forward = nnx.jit(clip.CLIPTextModel.__call__)  # once, so that models of one config share a compilation


def run(model: clip.CLIPTextModel, ids: np.ndarray) -> np.ndarray:
    return np.asarray(forward(model, jnp.asarray(ids)))


def reference_run(ref, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor(ids)).last_hidden_state.numpy()


IDS = {length: np.random.default_rng(length).integers(0, 100, (2, length)) for length in (16, 7)}


@pytest.mark.parametrize("length", sorted(IDS))
def test_matches_transformers(reference, length):
    ref, folder = reference
    got, want = run(from_folder(folder), IDS[length]), reference_run(ref, IDS[length])
    assert got.shape == want.shape == (2, length, 32)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_transformers5_saves_unprefixed_keys(reference):
    _, folder = reference
    keys = load_file(folder / "model.safetensors").keys()
    assert "embeddings.token_embedding.weight" in keys
    assert not any(k.startswith("text_model.") for k in keys)


def test_prefixed_checkpoint_with_position_ids_loads_identically(reference):
    ref, folder = reference
    # transformers 4 and the SD releases: prefixed keys, and the position_ids buffer.
    tensors = {f"text_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
    config = clip.CLIPTextConfig.from_dict(ref.config.to_dict())
    np.testing.assert_array_equal(run(load(config, tensors), IDS[16]), run(from_folder(folder), IDS[16]))


def test_state_dict_round_trip_is_bit_exact(reference):
    _, folder = reference
    tensors = clip.normalize_keys(load_file(folder / "model.safetensors"))
    out = weights.state_dict(from_folder(folder))
    assert out.keys() == tensors.keys()
    assert all(k.startswith("text_model.") for k in out)
    assert all(out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k]) for k in tensors)


def test_export_loads_in_transformers(reference, tmp_path):
    from transformers import CLIPTextModel

    ref, folder = reference
    model = from_folder(folder)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    weights.write_safetensors(weights.state_dict(model), tmp_path / "model.safetensors")
    loaded, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.hidden_act == ref.config.hidden_act
    np.testing.assert_array_equal(reference_run(loaded, IDS[16]), reference_run(ref, IDS[16]))


def test_too_many_tokens_is_a_user_error():
    model = clip.CLIPTextModel(clip.CLIPTextConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="max_position_embeddings"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_act", "gelu_new"),
        ("model_type", "clip_vision_model"),
        ("num_attention_heads", 5),
        ("image_size", 224),
    ],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(UserError, match=key) as e:
        clip.CLIPTextConfig.from_dict({**TINY, key: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("eos", [99, 2])
def test_with_projection_matches_transformers(eos, tmp_path):
    """SDXL's second encoder: hidden_states[-2] and text_embeds. eos 2 is the legacy id of SDXL's configs,
    for which transformers pools at the largest token id instead of the first end-of-text token."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    ref = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **{**TINY, "eos_token_id": eos})).eval()
    perturb(ref, seed=4)
    ref.save_pretrained(tmp_path)
    config = clip.CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    model = clip.CLIPTextModelWithProjection(config, rngs=nnx.Rngs(0))
    weights.load_state_dict(model, clip.normalize_keys(load_file(tmp_path / "model.safetensors")), source="test")
    ids = np.random.default_rng(5).integers(3, 98, (3, 16))
    ids[:, 9:] = 99  # end-of-text as padding, as SDXL's first tokenizer pads; one row ends early
    ids[1, 4:] = 99
    with torch.no_grad():
        out = ref(torch.tensor(ids), output_hidden_states=True)
    penultimate, text_embeds = nnx.jit(clip.CLIPTextModelWithProjection.penultimate_and_text_embeds)(
        model, jnp.asarray(ids)
    )
    np.testing.assert_allclose(penultimate, out.hidden_states[-2].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text_embeds, out.text_embeds.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.penultimate(jnp.asarray(ids)), penultimate, rtol=1e-6, atol=1e-6)
    assert weights.state_dict(model).keys() == {k for k in ref.state_dict() if not k.endswith("position_ids")}
    assert config.to_dict("CLIPTextModelWithProjection")["architectures"] == ["CLIPTextModelWithProjection"]
