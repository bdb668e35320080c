"""Compiled classifier-free-guided sampling over the device mesh.

One jit-compiled function per (batch shape, settings) encodes the prompts, runs the whole denoising
loop (a `lax.fori_loop`, the conditional and unconditional halves of guidance in one UNet call) and
decodes the latents; each device of the mesh runs its share of the batch.

Reproducibility: image i of a prompt with seed s starts from the noise
    jax.random.normal(jax.random.fold_in(jax.random.key(s), i), latent_shape)    # float32
so it depends only on (prompt, seed, i, settings), not on the device count or the batch size, up to
the last float bits that other batch shapes' kernels round differently (docs/sampling.md).
"""

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from esd_jax import conditioning, parallel
from esd_jax.config import MAX_SEED, SCHEDULERS
from esd_jax.errors import UserError
from esd_jax.parallel import AXIS
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import (
    DPMSolverSchedule,
    EulerSchedule,
    NoiseSchedule,
    ddim_step,
    dpm_solver_step,
    euler_step,
    scale_model_input,
)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything the compiled function depends on besides array shapes (hashable: a jit static arg)."""

    steps: int
    guidance: float
    scheduler: str  # "ddim", "dpm++" or "euler"
    scheduler_config: str  # the pipeline's scheduler_config as sorted JSON
    latent_shape: tuple[int, int, int]  # (C, H, W)
    zero_null: bool = False  # the unconditional prompt as zeros (SDXL's force_zeros_for_empty_prompt)


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to make: image `index` (of num_per_prompt) of `prompt` with `seed`."""

    prompt: str
    seed: int
    index: int


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(seeds: jax.Array, indices: jax.Array, *, shape: tuple[int, int, int]) -> jax.Array:
    """[B, C, H, W] float32: row b is normal(fold_in(key(seeds[b]), indices[b]))."""
    return jax.vmap(lambda s, i: jax.random.normal(jax.random.fold_in(jax.random.key(s), i), shape))(seeds, indices)


def schedule_tables(scheduler: str, config: dict, steps: int):
    """(the scheduler's schedule, the per-step tables its sampling loop reads), built on the host."""
    if scheduler == "ddim":
        schedule = NoiseSchedule.from_config(config)
        return schedule, {"timesteps": schedule.timesteps(steps), "prev": schedule.prev_timesteps(steps)}
    if scheduler == "euler":
        schedule = EulerSchedule.from_config(config)
        sigmas = {"sigmas": schedule.sigmas(steps), "init_noise_sigma": schedule.init_noise_sigma(steps)}
        return schedule, {"timesteps": schedule.timesteps(steps), **sigmas}
    schedule = DPMSolverSchedule.from_config(config)
    return schedule, {"timesteps": schedule.timesteps(steps), "coefficients": schedule.coefficients(steps)}


def denoise(unet, settings: SamplerSettings, latents: jax.Array, cond, null) -> jax.Array:
    """The sampling loop from `latents` [B, C, H, W] (unit noise) under the conditioning `cond` [B, ...] and
    `null` (one prompt's) of esd_jax.conditioning.

    As diffusers' StableDiffusionPipeline: guidance applies when > 1, with the unconditional half first.
    """
    config = json.loads(settings.scheduler_config)
    b = latents.shape[0]
    guided = settings.guidance > 1.0
    context = conditioning.concat([conditioning.repeat(null, cond), cond]) if guided else cond  # [2B or B, ...]

    def model(x: jax.Array, t: jax.Array) -> jax.Array:
        if not guided:
            return unet(x, jnp.full((b,), t), **context).astype(jnp.float32)
        e_null, e_cond = jnp.split(unet(jnp.concatenate([x, x]), jnp.full((2 * b,), t), **context), 2)
        e_null, e_cond = e_null.astype(jnp.float32), e_cond.astype(jnp.float32)
        return e_null + settings.guidance * (e_cond - e_null)

    schedule, tables = schedule_tables(settings.scheduler, config, settings.steps)
    timesteps = jnp.asarray(tables["timesteps"])
    if settings.scheduler == "ddim":
        prev = jnp.asarray(tables["prev"])

        def body(i, carry):
            x, unused = carry
            return ddim_step(schedule, model(x, timesteps[i]), timesteps[i], prev[i], x), unused

    elif settings.scheduler == "euler":
        sigmas = jnp.asarray(tables["sigmas"])
        latents = latents * tables["init_noise_sigma"]

        def body(i, carry):
            x, unused = carry
            eps = model(scale_model_input(sigmas, i, x), timesteps[i])
            return euler_step(schedule, sigmas, eps, i, x), unused

    else:
        coefficients = jnp.asarray(tables["coefficients"])

        def body(i, carry):
            x, x0_prev = carry
            return dpm_solver_step(schedule, coefficients[i], model(x, timesteps[i]), x, x0_prev)

    x, _ = jax.lax.fori_loop(0, len(timesteps), body, (latents, jnp.zeros_like(latents)))
    return x


@functools.partial(jax.jit, static_argnames=("graphdefs", "settings", "mesh"))
def generate_batch(
    states, cond_ids, null_ids, times, latents, prefix=None, *, graphdefs, settings: SamplerSettings, mesh: Mesh
):
    """(images [B, H, W, 3] float32 in [0, 1], final latents [B, C, h, w]) for one global batch.

    `states` (unet, VAE, then the text encoders) are replicated; each text encoder's token ids [B, L] and
    the latents are sharded over the mesh's data axis, and every device samples and decodes its own rows.
    `times`: SDXL's time ids [6] (None otherwise). `prefix` [B, k, D]: token embeddings of the prompts'
    slots (conditioning.encode), sharded as the rows (None: none).
    """

    def local(states, cond_ids, null_ids, times, latents, prefix):
        unet, vae, *encoders = (nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True))
        cond = conditioning.encode(tuple(encoders), cond_ids, times, prefix)  # [b, ...]
        null = conditioning.first(conditioning.encode(tuple(encoders), tuple(i[None] for i in null_ids), times))
        x = denoise(unet, settings, latents, cond, conditioning.zeroed(null) if settings.zero_null else null)
        images = vae.decode(x / vae.scaling_factor).astype(jnp.float32)  # [b, 3, H, W] in [-1, 1]
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1), x

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS)),
        # As in the ESD step: replicated weights meet each device's own rows inside the sampling loop.
        check_vma=False,
    )(states, cond_ids, null_ids, times, latents, prefix)


class Sampler:
    """One pipeline's networks placed on a mesh, and the settings they sample with."""

    def __init__(
        self,
        pipe: StableDiffusion,
        *,
        steps: int = 50,
        guidance: float = 7.5,
        scheduler: str = "ddim",
        resolution: int = 0,
        batch_size: int = 8,
        mesh: Mesh | None = None,
        images: int | None = None,
    ):
        """`images`: how many images the job makes at most; a batch is no larger (rounded up to the device
        count), so a large --batch_size does not pad a short list to its full size."""
        if scheduler not in SCHEDULERS:
            raise UserError(f"scheduler {scheduler!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
        if steps < 1:
            raise UserError(f"the number of sampling steps must be at least 1, got {steps}")
        if batch_size < 1:
            raise UserError(f"the batch size must be at least 1, got {batch_size}")
        if not math.isfinite(guidance):
            raise UserError(f"the guidance scale must be a finite number, got {guidance}")
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self.settings = SamplerSettings(
            steps=steps,
            guidance=float(guidance),
            scheduler=scheduler,
            scheduler_config=json.dumps(pipe.scheduler_config, sort_keys=True),
            latent_shape=pipe.latent_shape(resolution),
            zero_null=pipe.zero_null,
        )
        # Build the schedule now, so an unsupported config or step count fails before any compiling.
        schedule_tables(scheduler, pipe.scheduler_config, steps)
        n = self.mesh.devices.size
        if images is not None:
            batch_size = min(batch_size, max(images, 1))
        self.batch_size = -(-batch_size // n) * n  # a multiple of the device count: every device gets rows
        self.prompt_ids = pipe.prompt_ids
        modules = (pipe.unet, pipe.vae, *pipe.text_encoders)
        self.graphdefs = tuple(nnx.graphdef(m) for m in modules)
        self.states = parallel.place(tuple(nnx.state(m) for m in modules), self.mesh)
        self.null_ids = parallel.place(tuple(ids[0] for ids in self.prompt_ids([""])), self.mesh)
        times = pipe.time_ids(resolution)
        self.times = None if times is None else parallel.place(times, self.mesh)

    def set_unet(self, unet: nnx.Module) -> None:
        """Samples with these UNet weights from now on (the same architecture: nothing recompiles)."""
        self.states = (parallel.place(nnx.state(unet), self.mesh), *self.states[1:])

    def sharded(self, x: np.ndarray) -> jax.Array:
        """A global array sharded over the mesh's data axis from the same host array on every host."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, parallel.batch_sharded(self.mesh), lambda index: x[index])

    def batches(
        self,
        items: Sequence[Item],
        latents: np.ndarray | None = None,
        prefix: np.ndarray | None = None,
        *,
        gather: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Samples `items` in batches; yields (positions in `items`, images [k, H, W, 3] float32 in [0, 1],
        final latents [k, C, h, w]) for the rows this host holds (every row with `gather`).

        `latents` [len(items), C, h, w], if given, replace the seeded initial noise; `prefix` [len(items),
        k, D], if given, is each prompt's embedding prefix (an adversarial prompt's: conditioning.encode),
        read before its tokens. The next batch is dispatched before the previous one is handed over, so
        the devices work while the host writes.
        """
        shape = self.settings.latent_shape
        if latents is not None and np.shape(latents) != (len(items), *shape):
            raise UserError(f"latents of shape {np.shape(latents)}; expected {(len(items), *shape)}")
        for item in items:
            if not 0 <= item.seed <= MAX_SEED:
                raise UserError(f"seed {item.seed} of prompt {item.prompt!r} is outside 0..{MAX_SEED}")
        pending = None
        for start in range(0, len(items), self.batch_size):
            chunk = list(items[start : start + self.batch_size])
            rows = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # padding, dropped below
            if latents is None:
                seeds = self.sharded(np.asarray([r.seed for r in rows], np.uint32))
                indices = self.sharded(np.asarray([r.index for r in rows], np.int32))
                x = initial_noise(seeds, indices, shape=shape)
            else:
                x = np.asarray(latents[start : start + len(chunk)], np.float32)
                x = self.sharded(np.concatenate([x, np.repeat(x[:1], len(rows) - len(chunk), axis=0)]))
            ids = self.prompt_ids([r.prompt for r in rows])
            rows_prefix = None
            if prefix is not None:
                ids = (conditioning.with_slots(ids[0], prefix.shape[1]),)
                chunk_prefix = np.asarray(prefix[start : start + len(chunk)], np.float32)
                rows_prefix = self.sharded(
                    np.concatenate([chunk_prefix, chunk_prefix[:1].repeat(len(rows) - len(chunk), 0)])
                )
            out = generate_batch(
                self.states,
                tuple(self.sharded(i) for i in ids),
                self.null_ids,
                self.times,
                x,
                rows_prefix,
                graphdefs=self.graphdefs,
                settings=self.settings,
                mesh=self.mesh,
            )
            if pending is not None:
                yield host_rows(*pending, gather=gather)
            pending = (start, len(chunk), out)
        if pending is not None:
            yield host_rows(*pending, gather=gather)


def host_rows(start: int, count: int, out: tuple[jax.Array, jax.Array], *, gather: bool):
    """Host copies of this host's rows of a batch (all rows with `gather`), padding dropped."""
    images, latents = out
    if gather:
        from jax.experimental import multihost_utils

        rows = np.arange(count)
        images, latents = (np.asarray(multihost_utils.process_allgather(a, tiled=True))[:count] for a in out)
        return start + rows, images, latents
    parts = []
    for image_shard, latent_shard in zip(images.addressable_shards, latents.addressable_shards, strict=True):
        lo, hi, _ = image_shard.index[0].indices(images.shape[0])
        keep = min(hi, count) - lo
        if keep > 0:
            parts.append((np.arange(lo, lo + keep), image_shard.data[:keep], latent_shard.data[:keep]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, *images.shape[1:]), np.float32), np.zeros((0, *latents.shape[1:]))
    rows, image_rows, latent_rows = zip(*parts, strict=True)
    return start + np.concatenate(rows), np.concatenate(image_rows), np.concatenate(latent_rows)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def make_items(prompts: str | Sequence[str], seeds: int | Sequence[int], num_per_prompt: int) -> list[Item]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise UserError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed, or one per prompt")
    if num_per_prompt < 1:
        raise UserError(f"num_per_prompt must be at least 1, got {num_per_prompt}")
    return [Item(p, int(s), i) for p, s in zip(prompts, seeds, strict=True) for i in range(num_per_prompt)]


def sample_with_latents(
    pipe: StableDiffusion,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = 0,
    num_per_prompt: int = 1,
    latents: np.ndarray | None = None,
    **settings,
) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, 3] float32 in [0, 1], final latents [N, C, h, w]); see `sample`."""
    items = make_items(prompts, seeds, num_per_prompt)
    sampler = Sampler(pipe, **settings, images=len(items))
    images = np.zeros((len(items), 0))
    final = None
    for positions, image_rows, latent_rows in sampler.batches(items, latents, gather=True):
        if final is None:
            images = np.zeros((len(items), *image_rows.shape[1:]), np.float32)
            final = np.zeros((len(items), *latent_rows.shape[1:]), np.float32)
        images[positions], final[positions] = image_rows, latent_rows
    return images, final


def sample(
    pipe: StableDiffusion,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = 0,
    num_per_prompt: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    resolution: int = 0,
    batch_size: int = 8,
    mesh: Mesh | None = None,
    latents: np.ndarray | None = None,
) -> np.ndarray:
    """Images [len(prompts) * num_per_prompt, H, W, 3] uint8, prompt by prompt.

    `seeds`: one for all prompts or one per prompt; image i of a prompt starts from the noise
    normal(fold_in(key(seed), i)), or from `latents` [N, C, h, w] when given. `scheduler` "ddim",
    "dpm++" (DPM-Solver++ 2M) or "euler" (diffusers' EulerDiscreteScheduler, SDXL's); `resolution` in
    pixels (0: the model's native size); `batch_size` images per compiled call over all devices of
    `mesh` (default: every device).
    """
    images, _ = sample_with_latents(
        pipe,
        prompts,
        seeds=seeds,
        num_per_prompt=num_per_prompt,
        latents=latents,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        resolution=resolution,
        batch_size=batch_size,
        mesh=mesh,
    )
    return to_uint8(images)
