"""DDIM and DPM-Solver++ timesteps and steps against diffusers' schedulers on the same inputs."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from esd_jax.errors import UserError
from esd_jax.schedulers import DPMSolverSchedule, NoiseSchedule, ddim_step, dpm_solver_step

SD14 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {"timestep_spacing": "linspace", "set_alpha_to_one": True},
        {"clip_sample": True, "beta_schedule": "linear"},
    ],
)
@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_matches_diffusers(overrides, steps):
    # A PNDM config, as SD 1.4 ships it (with clip_sample false), read as DDIM, as DDIMScheduler.from_config does.
    config = dict(PNDMScheduler(**SD14).config) | {"clip_sample": False} | overrides
    config.pop("_use_default_values")  # as in a saved scheduler_config.json
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(config)
    timesteps = schedule.timesteps(steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for i in (0, steps // 2, steps - 1):
        out = rng.standard_normal(x.shape).astype(np.float32)
        t = int(timesteps[i])
        want = ref.step(torch.tensor(out), t, torch.tensor(x)).prev_sample.numpy()
        got = ddim_step(
            schedule, jnp.asarray(out), jnp.int32(t), jnp.int32(schedule.prev_timesteps(steps)[i]), jnp.asarray(x)
        )
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_unsupported_settings_name_the_key():
    with pytest.raises(UserError, match="beta_schedule='squaredcos_cap_v2' is not supported"):
        NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(UserError, match="sampling steps must be in 1..1000, got 0"):
        NoiseSchedule.from_config(SD14).timesteps(0)


@pytest.mark.parametrize("schedule", [NoiseSchedule, DPMSolverSchedule])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 is not supported; supported: an int >= 1"),
        ({"num_train_timesteps": -5}, "num_train_timesteps=-5 is not supported"),
        ({"num_train_timesteps": "abc"}, "num_train_timesteps='abc' is not supported"),
        ({"num_train_timesteps": True}, "num_train_timesteps=True is not supported"),
        ({"beta_start": 0.02}, "beta_end=0.012 is not supported; supported: a number in [beta_start=0.02, 1)"),
        ({"beta_start": -0.1}, "beta_start=-0.1 is not supported; supported: a number in (0, 1)"),
        ({"beta_end": 1.0}, "beta_end=1.0 is not supported"),
        ({"beta_start": "0.1"}, "beta_start='0.1' is not supported"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas=[0.1, 0.2] is not supported; supported: null, or 1000 numbers"),
        ({"beta_schedule": "cosine"}, "beta_schedule='cosine' is not supported; supported: 'linear', 'scaled_linear'"),
        ({"prediction_type": "sample"}, "prediction_type='sample' is not supported; supported: 'epsilon'"),
        ({"steps_offset": -1}, "steps_offset=-1 is not supported; supported: an int in 0..999"),
        ({"steps_offset": 1.5}, "steps_offset=1.5 is not supported"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras' is not supported; supported: 'leading'"),
        ({"thresholding": True}, "thresholding=True is not supported; supported: False"),
    ],
)
def test_nonsense_configs_name_the_key_and_the_accepted_values(schedule, overrides, message):
    with pytest.raises(UserError) as err:
        schedule.from_config(SD14 | overrides)
    assert str(err.value).startswith(f"scheduler config: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "schedule, overrides, message",
    [
        (NoiseSchedule, {"clip_sample": "yes"}, "clip_sample='yes' is not supported; supported: True, False"),
        (NoiseSchedule, {"clip_sample_range": 0}, "clip_sample_range=0 is not supported"),
        (DPMSolverSchedule, {"solver_order": True}, "solver_order=True is not supported; supported: 1, 2"),
        (DPMSolverSchedule, {"lower_order_final": 1}, "lower_order_final=1 is not supported; supported: True, False"),
        (DPMSolverSchedule, {"lambda_min_clipped": "x"}, "lambda_min_clipped='x' is not supported"),
    ],
)
def test_each_samplers_own_keys_are_checked(schedule, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        schedule.from_config(SD14 | overrides)


def test_steps_offset_past_the_last_timestep_is_refused():
    """diffusers indexes alpha-bar out of range here (SD's steps_offset=1 with 1000 DDIM steps reach t=1000)."""
    assert NoiseSchedule.from_config(SD14).timesteps(500)[0] == 999
    with pytest.raises(UserError, match=r"1000 steps with the scheduler config's steps_offset=1 reach timestep 1000"):
        NoiseSchedule.from_config(SD14).timesteps(1000)
    with pytest.raises(UserError, match="steps_offset=1 reach timestep 1000"):
        DPMSolverSchedule.from_config(SD14 | {"timestep_spacing": "leading"}).timesteps(999)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD 1.4's config read as DPM-Solver++: linspace spacing (DPM's default), epsilon
        {"timestep_spacing": "leading"},
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {"final_sigmas_type": "sigma_min", "solver_type": "heun"},
        {"euler_at_final": True, "lower_order_final": False},
    ],
)
@pytest.mark.parametrize("steps", [20, 7])
def test_dpm_solver_matches_diffusers(overrides, steps):
    config = dict(PNDMScheduler(**SD14).config) | overrides
    config.pop("_use_default_values")
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(steps)
    schedule = DPMSolverSchedule.from_config(config)
    timesteps = schedule.timesteps(steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    coefficients = jnp.asarray(schedule.coefficients(steps))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    want, got, x0 = torch.tensor(x), jnp.asarray(x), jnp.zeros(x.shape)
    for i, t in enumerate(timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.tensor(out), int(t), want).prev_sample
        got, x0 = dpm_solver_step(schedule, coefficients[i], jnp.asarray(out), got, x0)
        scale = max(1.0, float(want.abs().max()))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {i}")
