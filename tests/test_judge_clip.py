"""The CLIP judge against transformers' CLIPModel on a tiny random model saved locally: scores, the
zero-shot concept reading, the summary, and a model that is not there."""

import numpy as np
import pytest
import torch

from conftest import WORDS, perturb
from esd_jax.errors import UserError
from esd_jax.judges.clip import NEUTRAL, CLIPJudge
from esd_jax.models import clip_vision
from esd_jax.tokenizer import make_clip_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    tokenizer = make_clip_tokenizer(WORDS, max_length=16, pad_token="<|endoftext|>")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    ref = CLIPModel(CLIPConfig(text_config=text, vision_config=vision | dict(image_size=32, patch_size=8)))
    perturb(ref.eval(), seed=9)
    path = tmp_path_factory.mktemp("clip-judge")
    ref.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_scores_and_the_concept_reading_match_transformers(folder):
    from transformers import CLIPModel, CLIPTokenizer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    rows = [{"prompt": p} for p in ("a red circle", "van gogh painting", "a photo", "green", "a red circle")]
    judge = CLIPJudge(str(folder), concept="van gogh")
    records = judge.judge(images, rows)

    ref, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    pixels = np.asarray(clip_vision.preprocess(np.stack(images), 32))  # its own test holds it to CLIP's processor

    def texts(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        return ref.get_text_features(ids.input_ids).pooler_output

    with torch.no_grad():
        found = ref.get_image_features(torch.tensor(pixels)).pooler_output
        cos = torch.nn.functional.cosine_similarity(found, texts([r["prompt"] for r in rows]))
        labels = texts(["van gogh", NEUTRAL])
        near = torch.nn.functional.cosine_similarity(found[:, None], labels[None], dim=-1)
    want = (100 * cos.clamp(min=0)).numpy()
    np.testing.assert_allclose([r["clip_score"] for r in records], want, rtol=1e-4, atol=1e-3)
    assert [r["shows_concept"] for r in records] == (near[:, 0] > near[:, 1]).tolist()

    summary = judge.summary(records, rows)
    assert summary["images"] == 5 and summary["clip_score"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert summary["concept_rate"] == pytest.approx(float((near[:, 0] > near[:, 1]).float().mean()))
    assert CLIPJudge(str(folder)).summary(records, rows)["concept_rate"] is None


def test_a_clip_model_not_there_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="CLIP model 'esd-jax-tests/no-such-clip' is not in the Hugging Face cache"):
        CLIPJudge("esd-jax-tests/no-such-clip")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        CLIPJudge(str(tmp_path))
