"""The DDPM noise schedule, the DDIM step, DPM-Solver++ (2M) and the Euler step as pure functions
(traceable under jit).

Equal to diffusers' DDIMScheduler, DPMSolverMultistepScheduler and EulerDiscreteScheduler built from a
pipeline's scheduler_config (`DDIMScheduler.from_config`, ...): the same config gives the same timesteps
and the same updates. Each reads the keys its diffusers class knows and takes that class's defaults for
the rest, as `from_config` does.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esd_jax.errors import UserError

# The training schedule's defaults, the same in every diffusers scheduler here.
TRAIN_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
)
# DDIMScheduler's defaults for keys a scheduler_config of another class (SD 1.4's PNDM) may lack.
DEFAULTS = dict(
    **TRAIN_DEFAULTS,
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    thresholding=False,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def check(c: dict[str, Any], key: str, ok: bool, supported: str) -> None:
    if not ok:
        raise UserError(f"scheduler config: {key}={c[key]!r} is not supported; supported: {supported}")


def check_supported(c: dict[str, Any], key: str, supported: tuple) -> None:
    # `type(...) is`: True == 1 and 1 == True, but a flag is not a count and a count is not a flag.
    ok = any(type(c[key]) is type(s) and c[key] == s for s in supported)
    check(c, key, ok, ", ".join(map(repr, supported)))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def check_shared(c: dict[str, Any]) -> None:
    """The keys every sampler reads besides the betas; diffusers takes any value of most of them and then
    indexes out of range (steps_offset, num_train_timesteps) or fails at its first step."""
    n = c["num_train_timesteps"]
    check(c, "num_train_timesteps", is_int(n) and n >= 1, "an int >= 1 (SD: 1000)")
    check_supported(c, "rescale_betas_zero_snr", (False,))
    check_supported(c, "prediction_type", ("epsilon", "v_prediction"))
    check_supported(c, "timestep_spacing", ("leading", "trailing", "linspace"))
    check(c, "steps_offset", is_int(c["steps_offset"]) and 0 <= c["steps_offset"] < n, f"an int in 0..{n - 1}")


def train_alphas_cumprod(c: dict[str, Any]) -> np.ndarray:
    """alpha-bar of each training timestep [num_train_timesteps] float32, as diffusers computes it, from
    betas in (0, 1) (beta 1 makes alpha-bar 0, and x_0 = x / 0) rising from beta_start to beta_end."""
    check_shared(c)
    n = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        tb = c["trained_betas"]
        ok = isinstance(tb, list | tuple) and len(tb) == n and all(is_number(b) and 0 < b < 1 for b in tb)
        check(c, "trained_betas", ok, f"null, or {n} numbers in (0, 1), one per training timestep")
        betas = np.asarray(tb, np.float32)
    else:
        check_supported(c, "beta_schedule", ("linear", "scaled_linear"))
        start, end = c["beta_start"], c["beta_end"]
        check(c, "beta_start", is_number(start) and 0 < start < 1, "a number in (0, 1) (SD: 0.00085)")
        check(c, "beta_end", is_number(end) and start <= end < 1, f"a number in [beta_start={start}, 1) (SD: 0.012)")
        if c["beta_schedule"] == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        else:
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    return np.cumprod(1.0 - betas, dtype=np.float32)


SD1_DDIM_CONFIG = {  # SD 1.x's training schedule and sampler, as its scheduler_config.json gives them
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


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
        alphas_cumprod = train_alphas_cumprod(c)
        n = c["num_train_timesteps"]
        check_supported(c, "thresholding", (False,))
        for key in ("clip_sample", "set_alpha_to_one"):
            check_supported(c, key, (True, False))
        check(c, "clip_sample_range", is_number(c["clip_sample_range"]) and c["clip_sample_range"] > 0, "a number > 0")
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
            t = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + self.steps_offset
            return check_in_range(t, n, self.steps_offset)
        if self.timestep_spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)

    def prev_timesteps(self, steps: int) -> np.ndarray:
        """The timestep each DDIM step lands on (negative: past the end, x_0)."""
        return self.timesteps(steps) - self.num_train_timesteps // steps


def check_in_range(timesteps: np.ndarray, n: int, steps_offset: int) -> np.ndarray:
    """`timesteps`, if none is past the last training timestep; "leading" spacing shifts them all by
    steps_offset, which a config allows but diffusers then indexes out of range with."""
    if timesteps.max() >= n:
        raise UserError(
            f"{len(timesteps)} steps with the scheduler config's steps_offset={steps_offset} reach timestep "
            f"{timesteps.max()}, past the last one ({n - 1}); use fewer steps"
        )
    return timesteps


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


# DPMSolverMultistepScheduler's defaults: DPM-Solver++ (2M), as `DPMSolverMultistepScheduler.from_config(
# pipe.scheduler.config)` builds it from a config of another class.
DPM_DEFAULTS = dict(
    **TRAIN_DEFAULTS,
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
    use_flow_sigmas=False,
    final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)


@dataclasses.dataclass(frozen=True)
class DPMSolverSchedule:
    """DPM-Solver++ (Lu et al. 2022), multistep, first or second order, deterministic."""

    alphas_cumprod: np.ndarray  # [num_train_timesteps] float32
    num_train_timesteps: int
    prediction_type: str
    solver_order: int
    solver_type: str  # "midpoint" or "heun": the second-order correction
    lower_order_final: bool  # first-order steps at the end of short (< 15 step) schedules
    euler_at_final: bool
    final_sigmas_type: str  # "zero": the last step lands on x_0; "sigma_min": on the lowest training noise
    lambda_min_clipped: float
    timestep_spacing: str
    steps_offset: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DPMSolverSchedule":
        c = {**DPM_DEFAULTS, **{k: v for k, v in config.items() if k in DPM_DEFAULTS}}
        # Names of other solvers' configs that diffusers maps onto DPM-Solver++ (DEIS, UniPC).
        c["algorithm_type"] = "dpmsolver++" if c["algorithm_type"] == "deis" else c["algorithm_type"]
        c["solver_type"] = "midpoint" if c["solver_type"] in ("logrho", "bh1", "bh2") else c["solver_type"]
        alphas_cumprod = train_alphas_cumprod(c)
        check_supported(c, "thresholding", (False,))
        check_supported(c, "algorithm_type", ("dpmsolver++",))
        check_supported(c, "solver_order", (1, 2))
        check_supported(c, "solver_type", ("midpoint", "heun"))
        check_supported(c, "final_sigmas_type", ("zero", "sigma_min"))
        check_supported(c, "variance_type", (None,))
        for key in ("lower_order_final", "euler_at_final"):
            check_supported(c, key, (True, False))
        check(c, "lambda_min_clipped", is_number(c["lambda_min_clipped"]), "a number, or -Infinity (no clipping)")
        for key in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ):
            check_supported(c, key, (False,))
        return cls(
            alphas_cumprod=alphas_cumprod,
            num_train_timesteps=int(c["num_train_timesteps"]),
            prediction_type=c["prediction_type"],
            solver_order=int(c["solver_order"]),
            solver_type=c["solver_type"],
            lower_order_final=bool(c["lower_order_final"]),
            euler_at_final=bool(c["euler_at_final"]),
            final_sigmas_type=c["final_sigmas_type"],
            lambda_min_clipped=float(c["lambda_min_clipped"]),
            timestep_spacing=c["timestep_spacing"],
            steps_offset=int(c["steps_offset"]),
        )

    def timesteps(self, steps: int) -> np.ndarray:
        """The inference timesteps, highest first (DPMSolverMultistepScheduler.set_timesteps)."""
        n = self.num_train_timesteps
        if not 0 < steps < n:
            raise UserError(f"the number of DPM-Solver++ sampling steps must be in 1..{n - 1}, got {steps}")
        ac = self.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last = n - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            t = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1].astype(np.int64) + self.steps_offset
            check_in_range(t, n, self.steps_offset)
        else:  # trailing
            t = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
        if len(np.unique(t)) != len(t):
            raise UserError(f"{steps} DPM-Solver++ steps repeat timesteps in this schedule; use fewer steps")
        return t

    def coefficients(self, steps: int) -> np.ndarray:
        """[N, 5] float32 per step: alpha_s, sigma_s (to turn the model output into x_0) and ratio, w0, w1
        of the update x_next = ratio * x + w0 * x0 + w1 * (x0 - x0_prev), as diffusers computes them."""
        timesteps = self.timesteps(steps)
        ac = self.alphas_cumprod
        sigmas = (((1 - ac) / ac) ** 0.5).astype(np.float32)
        last = sigmas[0] if self.final_sigmas_type == "sigma_min" else np.float32(0)
        sigmas = np.concatenate([sigmas[timesteps], [last]]).astype(np.float32)
        alpha = (1 / (sigmas**2 + 1) ** 0.5).astype(np.float32)
        sigma = (sigmas * alpha).astype(np.float32)
        with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = inf, exp(-h) = 0
            lam = np.log(alpha) - np.log(sigma)
        n = len(timesteps)
        rows = []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            ratio = sigma[i + 1] / sigma[i]
            w0 = -(alpha[i + 1] * (np.exp(-h) - np.float32(1)))
            final = i == n - 1 and (
                self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
            )
            w1 = np.float32(0)
            if self.solver_order == 2 and i > 0 and not final:
                r0 = (lam[i] - lam[i - 1]) / h
                if self.solver_type == "midpoint":
                    w1 = np.float32(0.5) * w0 / r0
                else:
                    w1 = alpha[i + 1] * ((np.exp(-h) - np.float32(1)) / h + np.float32(1)) / r0
            rows.append([alpha[i], sigma[i], ratio, w0, w1])
        return np.asarray(rows, np.float32)


def dpm_solver_step(
    schedule: DPMSolverSchedule, coefficients: jax.Array, model_output: jax.Array, sample: jax.Array, x0_prev: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++ update with one row of `schedule.coefficients(steps)`; returns (x_next, x0) and
    takes the previous step's x0 (any array at the first step, whose w1 is 0)."""
    alpha_s, sigma_s, ratio, w0, w1 = (coefficients[k] for k in range(5))
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if schedule.prediction_type == "epsilon":
        x0 = (x - sigma_s * out) / alpha_s
    else:  # v_prediction
        x0 = alpha_s * x - sigma_s * out
    x_next = ratio * x + w0 * x0 + w1 * (x0 - x0_prev)
    return x_next.astype(sample.dtype), x0


# EulerDiscreteScheduler's defaults, as `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` builds
# it from a config of another class. sigma_min and sigma_max are absent: diffusers reads them only to
# bound the Karras, exponential and beta sigmas, which are refused here.
EULER_DEFAULTS = dict(
    **TRAIN_DEFAULTS,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    timestep_spacing="linspace",
    timestep_type="discrete",
    steps_offset=0,
    rescale_betas_zero_snr=False,
    final_sigmas_type="zero",
)


@dataclasses.dataclass(frozen=True)
class EulerSchedule:
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 2 with
    S_churn = 0), deterministic: SDXL's sampler. The sample lives at x_0 + sigma * noise, not at the
    unit-variance x_t of DDIM; `scale_model_input` maps it back for the UNet."""

    train_sigmas: np.ndarray  # [num_train_timesteps] float32, sqrt((1 - alpha-bar) / alpha-bar)
    num_train_timesteps: int
    prediction_type: str
    timestep_spacing: str
    steps_offset: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "EulerSchedule":
        c = {**EULER_DEFAULTS, **{k: v for k, v in config.items() if k in EULER_DEFAULTS}}
        ac = train_alphas_cumprod(c)
        check_supported(c, "interpolation_type", ("linear",))
        check_supported(c, "timestep_type", ("discrete",))
        check_supported(c, "final_sigmas_type", ("zero",))
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            check_supported(c, key, (False,))
        return cls(
            train_sigmas=(((1 - ac) / ac) ** 0.5).astype(np.float32),
            num_train_timesteps=int(c["num_train_timesteps"]),
            prediction_type=c["prediction_type"],
            timestep_spacing=c["timestep_spacing"],
            steps_offset=int(c["steps_offset"]),
        )

    def timesteps(self, steps: int) -> np.ndarray:
        """The UNet's timestep input at each step [steps] float32, highest first
        (EulerDiscreteScheduler.set_timesteps); "linspace" gives fractional ones."""
        n = self.num_train_timesteps
        if not 0 < steps <= n:
            raise UserError(f"the number of sampling steps must be in 1..{n}, got {steps}")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            # steps_offset may push the first to n; diffusers then takes the last training sigma (np.interp
            # clamps), so no refusal as in DDIM, where it indexes out of range.
            return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + self.steps_offset
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1  # trailing

    def sigmas(self, steps: int) -> np.ndarray:
        """The noise level at each step and after the last [steps + 1] float32, falling to 0: the training
        sigmas interpolated linearly at the timesteps."""
        t = self.timesteps(steps)
        sigmas = np.interp(t, np.arange(self.num_train_timesteps), self.train_sigmas)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def init_noise_sigma(self, steps: int) -> float:
        """The scale of the starting latents' unit noise, as diffusers takes it: sqrt(sigma_max^2 + 1), the
        standard deviation of x_0 + sigma_max * noise, for "leading" spacing, and sigma_max for the others."""
        sigma_max = self.sigmas(steps).max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max**2 + np.float32(1)))


def scale_model_input(sigmas: jax.Array, i: jax.Array, sample: jax.Array) -> jax.Array:
    """The UNet's input at step i of `sigmas` (`EulerSchedule.sigmas(steps)`): the sample divided by its
    standard deviation sqrt(sigma^2 + 1), which is the x_t of the training noise schedule."""
    return sample / jnp.sqrt(sigmas[i] ** 2 + 1)


def euler_step(
    schedule: EulerSchedule, sigmas: jax.Array, model_output: jax.Array, i: jax.Array, sample: jax.Array
) -> jax.Array:
    """One Euler step from sigmas[i] to sigmas[i + 1] (EulerDiscreteScheduler.step with its defaults);
    `model_output` is the UNet's at `scale_model_input(sigmas, i, sample)`, `sample` is unscaled."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * out
    else:  # v_prediction, in the sample's scale: x0 = c_skip * x + c_out * v
        x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    # Through x0 and the derivative as diffusers does, so the rounding matches too.
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).astype(sample.dtype)
