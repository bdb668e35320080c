"""The toy world, its oracle, and a smoke run of the toy trainer (tiny networks, a few steps per stage)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from esd_jax import weights
from esd_jax.pipeline import load_pipeline
from esd_jax.toy import oracle, world
from esd_jax.toy.model import ToyModel
from esd_jax.toy.train import TrainToyConfig, train

ATTRIBUTES = {"colour": world.COLOURS, "shape": world.SHAPES, "style": world.STYLES}


def accuracy(batch: world.Batch, reading: oracle.Reading) -> dict[str, float]:
    return {
        a: float(np.mean(np.array(names)[getattr(batch, a)] == getattr(reading, a))) for a, names in ATTRIBUTES.items()
    }


def test_world_is_deterministic_and_well_formed():
    a, b, c = world.sample(64, 3), world.sample(64, 3), world.sample(64, 4)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == np.float32
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_one_whole_shape_per_image():
    """No colour touches the frame; the coloured pixels form one patch of at least the minimum size."""
    images = (world.sample(500, 5).images + 1) / 2
    saturation = images.max(1) - images.min(1)  # [N, H, W]
    coloured = saturation > 0.05
    assert not coloured[:, [0, -1], :].any() and not coloured[:, :, [0, -1]].any()
    for mask in coloured:
        _, patches = ndimage.label(mask)
        assert patches == 1
    assert (saturation > oracle.SATURATED).sum((1, 2)).min() >= 2 * oracle.MIN_AREA


def test_captions_name_the_right_attributes():
    batch = world.sample(1000, 6)
    alone = set()
    for caption, *labels in zip(batch.captions, batch.colour, batch.shape, batch.style, strict=True):
        words = caption.replace(",", " ").split()
        assert set(words) <= set(world.WORDS)
        named = 0
        for (attribute, names), label in zip(ATTRIBUTES.items(), labels, strict=True):
            said = [w for w in words if w in names]
            assert said in ([], [names[label]]), (caption, attribute)
            named += bool(said)
        assert named >= 1, caption
        if len(words) == 1:
            alone.add(words[0])
    # Every colour, shape and the styles can be named alone ("red", "a circle", "striped").
    assert set(world.COLOURS) <= alone and {"striped", "dotted"} <= alone
    assert set(batch.captions) <= set(world.all_captions())


def test_oracle_reads_the_world(record_property):
    batch = world.sample(2000, 7)
    acc = accuracy(batch, oracle.read(batch.images))
    record_property("oracle_accuracy", acc)
    print("oracle accuracy on 2000 world images:", acc)
    assert min(acc.values()) >= 0.99, acc


def test_oracle_degrades_gracefully():
    """Slightly blurred and noisy images (as a decoder gives) still read right; noise and blanks read "none"."""
    batch = world.sample(500, 8)
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(batch.images, (0, 0, 0.7, 0.7)) + 0.05 * rng.standard_normal(batch.images.shape)
    acc = accuracy(batch, oracle.read(blurred))
    assert min(acc.values()) >= 0.95, acc
    noise = oracle.read(rng.uniform(-1, 1, (4, 3, 32, 32)))
    assert set(noise.colour) == set(noise.shape) == {"none"}
    blank = oracle.read(np.full((3, 32, 32), 0.64))  # the world's light grey, nothing on it
    assert (blank.colour[0], blank.shape[0], blank.style[0]) == ("none", "none", "plain")


TINY = ToyModel(vae_channels=(8,), unet_channels=(8,), unet_heads=2, text_width=16, text_layers=1, max_tokens=8)


def tiny_config(unet_steps: int) -> TrainToyConfig:
    return TrainToyConfig(model=TINY, vae_steps=3, vae_batch=2, unet_steps=unet_steps, batch=4, warmup_steps=2)


@pytest.mark.slow
def test_train_toy_exports_and_resumes(tmp_path):
    """Stage 1 and 2 run and export a loadable pipeline; a run stopped at step 4 and continued to 6 ends
    with the weights of an uninterrupted 6-step run."""
    folder = train(tiny_config(4), tmp_path / "run", minutes=10)
    assert folder == tmp_path / "run" / "pipeline"
    pipe = load_pipeline(folder)
    scale = json.loads((tmp_path / "run" / "vae" / "scaling_factor.json").read_text())["scaling_factor"]
    assert pipe.configs["vae"]["scaling_factor"] == pytest.approx(scale)
    assert pipe.configs["unet"]["block_out_channels"] == [8]
    assert len(pipe.tokenizer("a red circle, striped", add_special_tokens=False).input_ids) == 5  # a word a token

    train(tiny_config(6), tmp_path / "run", minutes=10)  # continues from the step-4 checkpoint
    rows = [json.loads(line) for line in (tmp_path / "run" / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "unet" / "loss.png").exists()

    train(tiny_config(6), tmp_path / "once", minutes=10)
    resumed = weights.state_dict(load_pipeline(tmp_path / "run" / "pipeline").unet)
    once = weights.state_dict(load_pipeline(tmp_path / "once" / "pipeline").unet)
    assert resumed.keys() == once.keys()
    for key in once:
        np.testing.assert_array_equal(resumed[key], once[key], err_msg=key)


def test_min_snr_weights_equal_diffusers():
    """The UNet stage's loss weights are diffusers' train_text_to_image --snr_gamma weights (epsilon
    prediction) on the toy scheduler, at every timestep; gamma 0 weighs every timestep 1."""
    import torch
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    from esd_jax.toy.model import SCHEDULER
    from esd_jax.toy.train import min_snr_weights

    t = np.arange(1000)
    snr = compute_snr(DDIMScheduler.from_config(SCHEDULER), torch.from_numpy(t))
    expected = (torch.clamp(snr, max=5.0) / snr).numpy()
    np.testing.assert_allclose(np.asarray(min_snr_weights(t, 5.0)), expected, rtol=1e-5)
    assert expected[0] < 0.01 and expected[-1] == 1.0  # the weighting matters at both ends
    np.testing.assert_array_equal(np.asarray(min_snr_weights(t, 0.0)), np.ones(1000))
