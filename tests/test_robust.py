"""Robust erasure: the inner attack in the step, the loss under its prefixes, a short run and its resumption."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from esd_jax import parallel
from esd_jax.config import EraseConfig, default_config
from esd_jax.errors import UserError
from esd_jax.esd import initial_state, make_erase_step, row_prompts, step_inputs
from esd_jax.partition import trainable_filter
from esd_jax.pipeline import load_pipeline
from esd_jax.robust import adversarial_cond, robust_inputs
from esd_jax.schedulers import NoiseSchedule
from esd_jax.train import encode_prompts, erase

TOKENS = 3


def toy_config(**overrides) -> EraseConfig:
    cfg = default_config()
    cfg.update(
        dict(
            model="toy",
            concept="red",
            method="esd-x-strict",
            ddim_steps=4,
            learning_rate=1e-2,
            robust_every=2,
            robust_steps=4,
            robust_lr=0.05,
            robust_tokens=TOKENS,
        )
        | overrides
    )
    return EraseConfig.from_config_dict(cfg)


@pytest.fixture(scope="module")
def robust_step():
    cfg = toy_config()
    pipe = load_pipeline("toy")
    prompts = encode_prompts(pipe, cfg)
    adversarial, adversary, text_graphdef = robust_inputs(pipe, cfg.concepts, TOKENS, cfg.seed)
    prompts = dataclasses.replace(prompts, adversarial=adversarial)
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, cfg.method), ...)
    original = jax.tree.map(jnp.copy, trainable)
    optimizer = optax.sgd(cfg.learning_rate)
    mesh = parallel.make_mesh()
    state = initial_state(trainable, optimizer, cfg.seed, adversary)
    inputs, placed = step_inputs(mesh, state, frozen, original, prompts, shard_params=False, frozen_dtype="float32")
    state, frozen, original, prompts = jax.device_put(inputs, placed)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    _, step = make_erase_step(cfg, graphdef, schedule, pipe.latent_shape(0), optimizer, mesh, text_graphdef)
    timesteps = jnp.asarray(schedule.timesteps(cfg.ddim_steps))
    return dict(
        step=step,
        state=state,
        frozen=frozen,
        original=original,
        prompts=prompts,
        graphdef=graphdef,
        text_graphdef=text_graphdef,
        timesteps=timesteps,
    )


@functools.partial(jax.jit, static_argnums=0)
def apply(graphdef, trainable, frozen, x, t, cond):
    return nnx.merge(graphdef, trainable, frozen)(x, t, **cond)


def predictions(s, trainable, pairs, cond) -> np.ndarray:
    return np.asarray(
        apply(s["graphdef"], trainable, s["frozen"], pairs.x_t, s["timesteps"][pairs.k], cond), np.float32
    )


@pytest.mark.slow
def test_the_inner_attack_runs_on_its_steps_and_brings_the_concept_back(robust_step):
    s = robust_step
    state = s["state"]
    pairs = s["step"].pairs(state, s["frozen"], s["original"], s["prompts"])
    assert np.isfinite(float(pairs.attack_loss))
    c = row_prompts(s["prompts"], pairs.prompt)[0]
    goal = predictions(s, s["original"], pairs, c)  # the frozen model under the concept

    def attack_objective(adversary) -> float:
        cond = adversarial_cond(s["text_graphdef"], s["prompts"].adversarial, adversary, pairs.prompt)
        return float(np.mean((predictions(s, state.trainable, pairs, cond) - goal) ** 2))

    before, after = attack_objective(state.adversary), attack_objective(pairs.adversary)
    assert after < 0.9 * before, (before, after)

    # The update trains ESD under the concept and under the adversarial prompt, from one loss.
    cond = row_prompts(s["prompts"], pairs.prompt)[1]
    adversarial = adversarial_cond(s["text_graphdef"], s["prompts"].adversarial, pairs.adversary, pairs.prompt)
    target = np.asarray(pairs.target)
    want_loss = np.mean((predictions(s, state.trainable, pairs, cond) - target) ** 2)
    want_adversarial = np.mean((predictions(s, state.trainable, pairs, adversarial) - target) ** 2)
    copied = jax.tree.map(jnp.copy, state)  # the update donates its state
    new_state, metrics = s["step"].update(copied, s["frozen"], s["original"], s["prompts"], pairs)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["adversarial_loss"]), want_adversarial, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(new_state.adversary), np.asarray(pairs.adversary))

    # Step 1 is not an attack's: the prefixes stay, and no attack loss is reported.
    later = s["step"].pairs(new_state, s["frozen"], s["original"], s["prompts"])
    np.testing.assert_array_equal(np.asarray(later.adversary), np.asarray(new_state.adversary))
    assert np.isnan(float(later.attack_loss))


def run(workdir, **overrides):
    settings = dict(trajectories=4, batch_per_device=2, checkpoint_every=1, iterations=4, workdir=str(workdir))
    return erase(toy_config(**(settings | overrides)))


@pytest.mark.slow
def test_a_short_robust_run_logs_its_losses(tmp_path):
    run(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["adversarial_loss"] > 0 for r in rows)
    assert [r["step"] for r in rows if "attack_loss" in r] == [1, 3]  # steps 0 and 2, counted from 0


@pytest.mark.slow
def test_a_robust_run_resumes_to_the_weights_of_one_run(tmp_path):
    """The prefixes are the run's state: a run resumed past an attack step ends as one that never stopped."""
    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", iterations=3)
    resumed = run(tmp_path / "resumed")
    from esd_jax.weights import read_safetensors

    a, b = read_safetensors(straight), read_safetensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7)


def test_robust_settings_are_checked():
    with pytest.raises(UserError, match="config.robust_lr=0.0: must be a positive finite number"):
        toy_config(robust_lr=0.0)
    with pytest.raises(UserError, match="config.robust_every=-1: give the iterations between inner attacks"):
        toy_config(robust_every=-1)
    pipe = load_pipeline("toy")
    with pytest.raises(UserError, match="config.robust_tokens=14: the prompt 'red' leaves no room"):
        robust_inputs(pipe, ["red"], 14, 0)
