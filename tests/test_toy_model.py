"""The shipped toy pipeline: its size, its loading in JAX and PyTorch, its quality gate, and a short erasure."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import esd_jax
from esd_jax import pipeline
from esd_jax.config import EraseConfig, EvaluateConfig
from esd_jax.run import apply_delta
from esd_jax.sampling.sampler import Sampler
from esd_jax.toy import evaluate as ev
from esd_jax.train import erase

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe():
    return esd_jax.load_pipeline("toy")


def test_shipped_model_is_small_and_whole():
    files = [f for f in pipeline.EMBEDDED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    names = {str(f.relative_to(pipeline.EMBEDDED)) for f in files}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"} <= names


def test_loads_in_pytorch_with_equal_unet_outputs(pipe):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(pipeline.EMBEDDED, safety_checker=None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([999, 250])
    ids = pipe.tokenizer(["a red circle", ""], padding="max_length", return_tensors="np").input_ids
    with torch.no_grad():
        context = reference.text_encoder(torch.from_numpy(ids))[0]
        expected = reference.unet(torch.from_numpy(x), torch.from_numpy(t), context).sample.numpy()
    got = pipe.unet(jnp.asarray(x), jnp.asarray(t), pipe.text_encoder(jnp.asarray(ids)))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected).mean() > 0.1


@pytest.mark.slow
def test_quality_gate(pipe, record_property):
    """Issue 5's gate, at the model's sampling settings: on 64 images per (colour, shape) prompt the oracle
    reads the prompt's colour at least 90% of the time and its shape at least 80%."""
    q = ev.quality(pipe, EvaluateConfig(num_per_prompt=64, batch_size=256))
    record_property("quality", q)
    assert q["colour"] >= 0.9 and q["shape"] >= 0.8, q
    # The confusion counts every image once ("none" included): each shape was asked 4 colours x 64 times.
    assert all(sum(row.values()) == 4 * 64 for row in q["confusion"].values())


def toy_config(**overrides) -> EraseConfig:
    spec = importlib.util.spec_from_file_location("toy_config", ROOT / "configs" / "toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dataclasses.replace(EraseConfig(**module.get_config().to_dict()), **overrides)


@pytest.mark.slow
def test_short_erase_removes_red_and_keeps_the_other_colours(tmp_path, record_property):
    """The README's first command (configs/toy.py: ESD-x-strict with retain prompts, the fast mode), its
    erased model measured on 8 images per prompt. Issue 13's aim: red on at most 5% of the images of
    every red prompt (from 1.00) and the other colours keeping 90% of their accuracy (0.98 before;
    docs/toy.md measures no red image on any red prompt and 0.93 pooled over three erase seeds and three
    evaluation seeds of 16 per prompt). One red image in a prompt's 8 is allowed for the smaller
    sample; the base model's side is test_quality_gate's."""
    # The README's global batch (4 samples an iteration on one device) over this suite's 4 devices: the
    # same samples, so the same erasure (results depend on the seed and the global batch only).
    cfg = toy_config(workdir=str(tmp_path / "red"), checkpoint_every=1000)
    assert cfg.model == "toy" and cfg.concept == "red" and cfg.iterations <= 400 and cfg.batch_per_device == 4
    assert 4 % jax.device_count() == 0
    cfg = dataclasses.replace(cfg, batch_per_device=4 // jax.device_count())
    erased = esd_jax.load_pipeline("toy")
    apply_delta(erased, erase(cfg))
    concept, settings = ev.parse_concept("red"), ev.toy_settings(EvaluateConfig(num_per_prompt=8))
    prompts = ev.prompts_for(concept)
    sampler = Sampler(erased, steps=settings.steps, guidance=settings.guidance, batch_size=settings.batch_size)
    measured = ev.measure(concept, prompts, ev.sample_prompts(sampler, prompts, settings))
    groups = measured["groups"]
    record_property("groups", groups)
    assert groups["concept"]["concept_rate"] <= 0.05
    assert all(measured["prompts"][p.text]["concept_rate"] <= 1 / 8 for p in prompts if p.group == "concept")
    assert groups["others"]["accuracy"]["colour"] >= 0.88
    # Erasure redraws the red prompts' shapes in another colour more often than it drops them (0.84 before).
    assert groups["concept"]["accuracy"]["shape"] >= 0.5
