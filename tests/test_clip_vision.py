"""The Flax CLIPModel and CLIPVisionModel against transformers' on the same random weights, the preprocessing
against CLIPImageProcessor's PIL backend, the CLIP score, the config and the key handling."""

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
from esd_jax.models import clip_vision

TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    bos_token_id=98,
    eos_token_id=99,
    pad_token_id=1,
)
# A width of its own and the other activation, so that swapped towers or projections cannot pass.
VISION = dict(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers CLIPModel with every parameter perturbed, the folder its save_pretrained wrote)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    ref = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).eval()
    perturb(ref, seed=7)
    folder = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def model(reference):
    return clip_vision.load_clip(reference[1])


PIXELS = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
IDS = np.random.default_rng(1).integers(2, 98, (3, 16))
IDS[:, 0] = 98
IDS[:, 9:] = 99  # end-of-text as padding; one row ends early
IDS[1, 4:] = 99
MASK = (np.cumsum(IDS == 99, axis=1) <= 1).astype(np.int64)  # CLIPProcessor's: up to the first end-of-text


# Once, so that models of one config share a compilation.
image_embeds = nnx.jit(clip_vision.CLIPModel.image_embeds)
text_embeds = nnx.jit(clip_vision.CLIPModel.text_embeds)


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_image_embeds_match_transformers(reference, model):
    ref, _ = reference
    with torch.no_grad():
        want = ref.get_image_features(torch.tensor(PIXELS)).pooler_output.numpy()
    got = image_embeds(model, jnp.asarray(PIXELS))
    assert got.shape == want.shape == (3, 16)
    assert relative_error(got, want) <= 1e-4


def test_text_embeds_match_transformers(reference, model):
    ref, _ = reference
    with torch.no_grad():
        want = ref.get_text_features(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).pooler_output.numpy()
    got = text_embeds(model, jnp.asarray(IDS))
    assert got.shape == want.shape == (3, 16)
    assert relative_error(got, want) <= 1e-4


def test_vision_model_matches_transformers(reference):
    ref, folder = reference
    tensors = clip_vision.normalize_keys(load_file(folder / "model.safetensors"))
    config = clip_vision.CLIPVisionConfig(**VISION)
    vision = nnx.eval_shape(lambda: clip_vision.CLIPVisionModel(config, rngs=nnx.Rngs(0)))
    weights.load_state_dict(vision, {k: v for k, v in tensors.items() if k.startswith("vision_model.")}, source="t")
    with torch.no_grad():
        out = ref.vision_model(torch.tensor(PIXELS))
    last, pooled = nnx.jit(clip_vision.CLIPVisionModel.__call__)(vision, jnp.asarray(PIXELS))
    assert last.shape == (3, 1 + 4 * 4, 48)
    assert relative_error(last, out.last_hidden_state.numpy()) <= 1e-4
    assert relative_error(pooled, out.pooler_output.numpy()) <= 1e-4


def test_clip_score_is_torchmetrics_formula(reference, model):
    ref, _ = reference
    with torch.no_grad():
        image = ref.get_image_features(torch.tensor(PIXELS)).pooler_output
        text = ref.get_text_features(torch.tensor(IDS)).pooler_output
    # Each pair once as it is and once with the text embedding negated, so both signs of cos are scored.
    image, text = torch.cat([image, image]), torch.cat([text, -text])
    want = 100 * torch.nn.functional.cosine_similarity(image, text, dim=-1).clamp(min=0)
    assert (want == 0).sum() == 3
    ours_image, ours_text = image_embeds(model, jnp.asarray(PIXELS)), text_embeds(model, jnp.asarray(IDS))
    got = clip_vision.clip_score(jnp.concatenate([ours_image] * 2), jnp.concatenate([ours_text, -ours_text]))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-3)


def test_state_dict_round_trip_is_bit_exact(reference, model):
    ref, folder = reference
    tensors = load_file(folder / "model.safetensors")
    out = weights.state_dict(model)
    assert out.keys() == tensors.keys() == {k for k in ref.state_dict() if not k.endswith("position_ids")}
    # logit_scale is the one 0-d tensor, which a layout conversion must not make 1-d.
    assert all(out[k].dtype == tensors[k].dtype and out[k].shape == tensors[k].shape for k in tensors)
    assert all(np.array_equal(out[k], tensors[k]) for k in tensors) and out["logit_scale"].shape == ()


def test_position_ids_buffers_are_dropped(reference, model):
    ref, _ = reference
    # transformers 4 before 4.31 saved both towers' position_ids as persistent buffers.
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
    tensors["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    other = nnx.eval_shape(lambda: clip_vision.CLIPModel(model.config, rngs=nnx.Rngs(1)))
    weights.load_state_dict(other, clip_vision.normalize_keys(tensors), source="test")
    np.testing.assert_array_equal(image_embeds(other, jnp.asarray(PIXELS)), image_embeds(model, jnp.asarray(PIXELS)))


def test_transformers4_config_reads_the_same(reference, model):
    """openai/clip-vit-large-patch14's config.json, as transformers 4 wrote it: every PreTrainedConfig attribute
    in both sub-configs (null token ids in the vision one), and *_config_dict overriding the sub-configs."""
    ref, _ = reference
    legacy = {"do_sample": False, "top_k": 50, "pruned_heads": {}, "tie_word_embeddings": True, "prefix": None}
    d = ref.config.to_dict()
    d["text_config"] = {**d["text_config"], **legacy, "hidden_size": 999}
    d["text_config_dict"] = {"hidden_size": 32}
    d["vision_config"] = {**d["vision_config"], **legacy, "bos_token_id": None, "eos_token_id": None}
    d["vision_config_dict"] = None
    assert clip_vision.CLIPConfig.from_dict(d) == model.config


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("vision_config", "hidden_act", "relu"),
        ("vision_config", "image_size", [32, 32]),
        ("vision_config", "patch_size", 0),
        ("vision_config", "num_attention_heads", 5),
        ("vision_config", "layer_norm_eps", -1),
        ("vision_config", "model_type", "clip_text_model"),
        ("vision_config", "vocab_size", 100),
        ("text_config", "hidden_act", "relu"),
        (None, "model_type", "siglip"),
        (None, "projection_size", 16),
    ],
)
def test_bad_config_is_one_line_naming_the_key(reference, where, key, value):
    d = reference[0].config.to_dict()
    (d[where] if where else d)[key] = value
    with pytest.raises(UserError, match=key) as e:
        clip_vision.CLIPConfig.from_dict(d)
    assert "\n" not in str(e.value)


def test_bad_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="config.json is missing") as e:
        clip_vision.load_clip(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"patch_size": 0}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json: vision encoder config key 'patch_size'"):
        clip_vision.load_clip(tmp_path)


def test_wrong_image_size_is_a_user_error(model):
    with pytest.raises(UserError, match="image_size is 32"):
        model.image_embeds(jnp.zeros((1, 3, 40, 40)))


# (height, width) of random images for a 32-pixel model: wider, taller, already the size, upscaled, and
# more than twice as tall as wide, where Pillow 13 runs the vertical pass first (in the other order these two
# are up to 0.3 off: clipping after the first pass does not commute).
SHAPES = [(37, 50), (64, 48), (32, 32), (20, 25), (90, 40), (100, 33)]
# One uint8 level in the normalised channel of the smallest std: where PIL's fixed-point weights round a
# value the other way.
LEVEL = 1 / 255 / min(clip_vision.OPENAI_CLIP_STD)


@pytest.mark.parametrize("shape", SHAPES)
def test_preprocess_matches_clip_image_processor(shape):
    from transformers import CLIPImageProcessorPil

    images = np.random.default_rng(shape[0]).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = processor(images=list(images), return_tensors="np")["pixel_values"]
    got = np.asarray(clip_vision.preprocess(jnp.asarray(images), 32))
    assert got.shape == want.shape == (2, 3, 32, 32)
    diff = np.abs(got - want)
    # Measured (Pillow 13.0, these images): at most one level (0.0150), in 0 to 0.1% of the values.
    assert diff.max() <= LEVEL + 1e-5
    assert (diff > 1e-5).mean() <= 0.005
