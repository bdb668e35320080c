"""The DDPM noise schedule and the DDIM step as pure functions of arrays (traceable under jit).

Equal to diffusers' DDIMScheduler built from a pipeline's scheduler_config (`DDIMScheduler.from_config`),
so the same config gives the same timesteps and the same updates.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esd_jax.errors import UserError

# DDIMScheduler's defaults for keys a scheduler_config of another class (SD 1.4's PNDM) may lack.
DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    thresholding=False,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: np.ndarray  # [num_train_timesteps] float32
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str
    clip_sample: float | None  # the clip range of the predicted x_0, or None
    timestep_spacing: str
    steps_offset: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        c = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
        n = c["num_train_timesteps"]
        if c["trained_betas"] is not None:
            betas = np.asarray(c["trained_betas"], np.float32)
        elif c["beta_schedule"] == "linear":
            betas = np.linspace(c["beta_start"], c["beta_end"], n, dtype=np.float32)
        elif c["beta_schedule"] == "scaled_linear":
            betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
        else:
            raise UserError(
                f"scheduler config: beta_schedule={c['beta_schedule']!r} is not supported; "
                "supported: 'linear', 'scaled_linear'"
            )
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if c[key]:
                raise UserError(f"scheduler config: {key}=True is not supported; supported: False")
        if c["prediction_type"] not in ("epsilon", "v_prediction"):
            raise UserError(
                f"scheduler config: prediction_type={c['prediction_type']!r} is not supported; "
                "supported: 'epsilon', 'v_prediction'"
            )
        if c["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise UserError(
                f"scheduler config: timestep_spacing={c['timestep_spacing']!r} is not supported; "
                "supported: 'leading', 'trailing', 'linspace'"
            )
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        return cls(
            alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=1.0 if c["set_alpha_to_one"] else float(alphas_cumprod[0]),
            num_train_timesteps=n,
            prediction_type=c["prediction_type"],
            clip_sample=float(c["clip_sample_range"]) if c["clip_sample"] else None,
            timestep_spacing=c["timestep_spacing"],
            steps_offset=int(c["steps_offset"]),
        )

    def timesteps(self, steps: int) -> np.ndarray:
        """The `steps` inference timesteps, highest first (DDIMScheduler.set_timesteps)."""
        n = self.num_train_timesteps
        if not 0 < steps <= n:
            raise UserError(f"the number of sampling steps must be in 1..{n}, got {steps}")
        if self.timestep_spacing == "leading":
            return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + self.steps_offset
        if self.timestep_spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)

    def prev_timesteps(self, steps: int) -> np.ndarray:
        """The timestep each DDIM step lands on (negative: past the end, x_0)."""
        return self.timesteps(steps) - self.num_train_timesteps // steps


def ddim_step(
    schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array, sample: jax.Array
) -> jax.Array:
    """One deterministic (eta = 0) DDIM update from timestep t to t_prev."""
    alphas = jnp.asarray(schedule.alphas_cumprod)
    alpha_t = alphas[t]
    alpha_prev = jnp.where(t_prev >= 0, alphas[jnp.maximum(t_prev, 0)], schedule.final_alpha_cumprod)
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if schedule.prediction_type == "epsilon":
        x0 = (x - jnp.sqrt(1 - alpha_t) * out) / jnp.sqrt(alpha_t)
        eps = out
    else:  # v_prediction
        x0 = jnp.sqrt(alpha_t) * x - jnp.sqrt(1 - alpha_t) * out
        eps = jnp.sqrt(alpha_t) * out + jnp.sqrt(1 - alpha_t) * x
    if schedule.clip_sample is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample, schedule.clip_sample)
    return (jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps).astype(sample.dtype)
