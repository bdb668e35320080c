"""The fast mode's cache: every step of the frozen model's trajectories under the concept, as ESD pairs.

With `xt_model="frozen"`, each guided DDIM step the per-iteration recipe takes to reach x_t evaluates the
frozen model at (x_k, t_k) under "" and the sampling prompt: without an erase-from prompt those are
exactly e_0 and e_c of the target at step k. So one trajectory of N steps holds N training pairs
(x_k, t_k, target_k) for the cost of N guided steps (an erase-from prompt adds one frozen call per step
for e_c); the recipe pays on average (N - 1) / 2 guided steps for each pair it trains on.

Trajectory j's concept and noise come from (seed, j), never from the device that samples it; a training
step draws its batch of (trajectory, step) pairs from (seed, epoch) without replacement within an epoch
(esd.pair_draws). With `refresh_every` = M, cache g (iterations g M + 1 ... (g + 1) M) holds
trajectories g T ... (g + 1) T - 1 of the same stream, so no two caches share one. With retain prompts
the cache also holds as many trajectories under them, drawn from esd.retain_key, whose targets are the
frozen model's predictions under their own prompt.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esd_jax import conditioning, parallel
from esd_jax.conditioning import concat, repeat
from esd_jax.esd import TRAJECTORY_STREAM, guided, retain_key, row_prompts, targets
from esd_jax.parallel import AXIS
from esd_jax.schedulers import NoiseSchedule, ddim_step


@dataclasses.dataclass
class Trajectories:
    """Every step of T trajectories (a multiple of the device count; pairs are drawn from the first
    `count`), followed with retain prompts by T under them: x_k before step k, and the target there."""

    x_t: jax.Array  # [T, N, C, H, W]; with retain prompts [2T, N, C, H, W]
    target: jax.Array  # float32, as x_t
    prompt: jax.Array  # [T] or [2T] int32: each trajectory's prompt (esd.row_prompts)


jax.tree_util.register_dataclass(Trajectories, data_fields=["x_t", "target", "prompt"], meta_fields=[])


def trajectory_draws(rng: jax.Array, count: int, num_prompts: int, first=0) -> tuple[jax.Array, jax.Array]:
    """(prompt [count], noise keys [count]) of trajectories first..first+count-1, from the run's key alone."""
    stream = jax.random.fold_in(rng, TRAJECTORY_STREAM)
    keys = jax.vmap(lambda j: jax.random.fold_in(stream, first + j))(jnp.arange(count))
    prompt = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, 1), (), 0, num_prompts))(keys)
    return prompt, jax.vmap(lambda key: jax.random.fold_in(key, 2))(keys)


def trajectory_pairs(unet, schedule: NoiseSchedule, objective, noise: jax.Array, c, f, null, retained=None):
    """(x_k [B, N, C, H, W], target_k [B, N, C, H, W]) along the guided DDIM trajectories from `noise` under
    the sampling prompts `f`, the targets as esd.esd_target computes them for the concepts `c` (and the
    `retained` rows)."""
    timesteps = jnp.asarray(schedule.timesteps(objective.ddim_steps))
    prev = jnp.asarray(schedule.prev_timesteps(objective.ddim_steps))
    b = noise.shape[0]
    contexts = [repeat(null, f), f] + ([c] if objective.erase_from else [])
    n = len(contexts)
    context = concat(contexts)

    def body(x, i):
        preds = unet(jnp.concatenate([x] * n), jnp.full((n * b,), timesteps[i]), **context)
        e_null, e_f, *rest = jnp.split(preds, n)
        e_0, e_f32 = e_null.astype(jnp.float32), e_f.astype(jnp.float32)
        e_c = rest[0].astype(jnp.float32) if objective.erase_from else e_f32
        target = targets(objective, e_0, e_c, e_f32 if objective.erase_from else e_0, retained)
        return ddim_step(schedule, guided(objective, e_null, e_f), timesteps[i], prev[i], x), (x, target)

    _, (xs, ys) = jax.lax.scan(body, noise, jnp.arange(objective.ddim_steps))  # [N, B, ...]
    return xs.swapaxes(0, 1), ys.swapaxes(0, 1)


def padded_count(count: int, devices: int) -> int:
    """The trajectories sampled for `count`: the next multiple of the device count."""
    return -(-count // devices) * devices


def make_trajectory_sampler(graphdef, schedule: NoiseSchedule, objective, mesh: Mesh, count: int):
    """The jit-compiled (original, frozen, prompts, rng, cache=0) -> Trajectories, cache g holding
    trajectories g count ... (g + 1) count - 1; each device samples its share.

    The count is padded to a multiple of the device count with trajectories no step draws from, so the
    pairs depend on the seed and the count only.
    """
    padded = padded_count(count, mesh.devices.size)

    def local(original, frozen, prompts, prompt, noise_keys):
        c, f, retained = row_prompts(prompts, prompt)
        noise = jax.vmap(lambda key: jax.random.normal(key, objective.latent_shape))(noise_keys)
        unet = nnx.merge(graphdef, original, frozen)
        return trajectory_pairs(unet, schedule, objective, noise, c, f, prompts.null, retained)

    def sharded(original, frozen):
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(parallel.local_specs(original), parallel.local_specs(frozen), P(), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS), P(AXIS)),
            check_vma=False,  # as in the ESD step: replicated weights meet each device's own trajectories
        )

    # Stated rather than left to the compiler, so that the step can be compiled for the cache before it exists.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P(AXIS)))
    def sample(original, frozen, prompts, rng, cache=0) -> Trajectories:
        n = conditioning.count(prompts.concept)
        prompt, noise_keys = trajectory_draws(rng, padded, n, first=cache * count)
        if prompts.retain is not None:
            kept, kept_keys = trajectory_draws(
                retain_key(rng), padded, conditioning.count(prompts.retain), first=cache * count
            )
            prompt, noise_keys = jnp.concatenate([prompt, kept + n]), jnp.concatenate([noise_keys, kept_keys])
        x_t, target = sharded(original, frozen)(original, frozen, prompts, prompt, noise_keys)
        return Trajectories(x_t=x_t, target=target, prompt=prompt)

    return sample
