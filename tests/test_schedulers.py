"""DDIM, DPM-Solver++ and Euler timesteps and steps against diffusers' schedulers on the same inputs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from esd_jax.errors import UserError
from esd_jax.schedulers import (
    DPMSolverSchedule,
    EulerSchedule,
    NoiseSchedule,
    ddim_step,
    dpm_solver_step,
    euler_step,
    scale_model_input,
)

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


@pytest.mark.parametrize("schedule", [NoiseSchedule, DPMSolverSchedule, EulerSchedule])
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
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True is not supported; supported: False"),
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
        (NoiseSchedule, {"thresholding": True}, "thresholding=True is not supported; supported: False"),
        (DPMSolverSchedule, {"thresholding": True}, "thresholding=True is not supported; supported: False"),
        (EulerSchedule, {"use_karras_sigmas": True}, "use_karras_sigmas=True is not supported; supported: False"),
        (EulerSchedule, {"use_exponential_sigmas": True}, "use_exponential_sigmas=True is not supported"),
        (EulerSchedule, {"use_beta_sigmas": True}, "use_beta_sigmas=True is not supported; supported: False"),
        (EulerSchedule, {"timestep_type": "continuous"}, "timestep_type='continuous' is not supported"),
        (EulerSchedule, {"interpolation_type": "log_linear"}, "interpolation_type='log_linear' is not supported"),
        (EulerSchedule, {"final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min' is not supported"),
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


# SDXL base 1.0's scheduler_config.json: SD's training schedule, Euler with "leading" spacing, and keys of
# other classes that Euler ignores.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def euler_reference(config: dict, steps: int) -> EulerDiscreteScheduler:
    ref = EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    return ref


# Sigmas to 1e-5 relative: numpy's float32 linspace and cumprod round alpha-bar differently from torch's, by up
# to 1.3e-6 relative, and sqrt((1 - alpha-bar) / alpha-bar) grows that to 3.4e-6 at the highest noise.
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_euler_timesteps_and_sigmas_match_diffusers(spacing, steps):
    config = SDXL | {"timestep_spacing": spacing}
    ref = euler_reference(config, steps)
    schedule = EulerSchedule.from_config(config)
    timesteps = schedule.timesteps(steps)
    assert timesteps.dtype == np.float32
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    sigmas = schedule.sigmas(steps)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(schedule.init_noise_sigma(steps), float(ref.init_noise_sigma), rtol=1e-5)


def test_euler_reads_other_classes_configs_and_ignores_their_keys():
    """SD 1.4's PNDM config, read as Euler (linspace: Euler's default), with keys diffusers' Euler ignores:
    thresholding is DDIM's, and sigma_min bounds only the Karras, exponential and beta sigmas."""
    config = dict(PNDMScheduler(**SD14).config) | {"thresholding": True, "sigma_min": 0.1}
    config.pop("_use_default_values")
    ref = euler_reference(config, 7)
    schedule = EulerSchedule.from_config(config)
    np.testing.assert_array_equal(schedule.timesteps(7), ref.timesteps.numpy())
    np.testing.assert_allclose(schedule.sigmas(7), ref.sigmas.numpy(), rtol=1e-5)


def test_euler_leading_steps_offset_past_the_last_timestep_is_what_diffusers_does():
    """Unlike DDIM's, diffusers' Euler takes timestep 1000 and the last training sigma for it."""
    ref = euler_reference(SDXL, 1000)
    schedule = EulerSchedule.from_config(SDXL)
    assert schedule.timesteps(1000)[0] == 1000
    np.testing.assert_array_equal(schedule.timesteps(1000), ref.timesteps.numpy())
    np.testing.assert_allclose(schedule.sigmas(1000), ref.sigmas.numpy(), rtol=1e-5)
    with pytest.raises(UserError, match="sampling steps must be in 1..1000, got 1001"):
        schedule.timesteps(1001)


def fake_model(x, t, sin):
    """A stand-in UNet whose output depends on its input and timestep, as the real one's does."""
    return 0.1 * x + sin(t)


# The latents after all steps: float32 rounding builds up to 6e-7 of the largest latent (measured), checked
# to 1e-5 of it.
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing, steps", [("leading", 50), ("trailing", 7), ("linspace", 7)])
def test_euler_sampling_loop_matches_diffusers(prediction_type, spacing, steps):
    config = SDXL | {"timestep_spacing": spacing, "prediction_type": prediction_type}
    ref = euler_reference(config, steps)
    schedule = EulerSchedule.from_config(config)
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)

    want = torch.tensor(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        out = fake_model(ref.scale_model_input(want, t), t, torch.sin)
        want = ref.step(out, t, want).prev_sample

    @jax.jit
    def sample(timesteps, sigmas, x):
        def body(i, x):  # i is traced: the sampler's fori_loop
            out = fake_model(scale_model_input(sigmas, i, x), timesteps[i], jnp.sin)
            return euler_step(schedule, sigmas, out, i, x)

        return jax.lax.fori_loop(0, steps, body, x)

    x = jnp.asarray(noise) * schedule.init_noise_sigma(steps)
    got = sample(jnp.asarray(schedule.timesteps(steps)), jnp.asarray(schedule.sigmas(steps)), x)
    scale = float(want.abs().max())
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5 * scale)
