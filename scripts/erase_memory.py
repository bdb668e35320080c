"""The memory an erase run's step holds on this host's device, as the run lays it out: the trained state,
the originals of the trained weights, Adam's moments, and the peak of each compiled program (XLA's memory
analysis: arguments, temporaries and outputs not written over donated arguments).

    python scripts/erase_memory.py --config configs/toy.py --config.lora_rank=4

What `esd-jax plan` reports for a TPU slice, for the devices at hand (CPU included), without running a step.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from esd_jax import parallel
from esd_jax.cli import erase_config
from esd_jax.esd import initial_state, make_erase_step, step_inputs
from esd_jax.partition import split_for_erase
from esd_jax.pipeline import load_pipeline
from esd_jax.plan import size
from esd_jax.schedulers import NoiseSchedule
from esd_jax.train import encode_prompts
from esd_jax.trajectories import make_trajectory_sampler


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main(argv: list[str]) -> None:
    cfg = erase_config(flags.FlagValues(), argv, "--config configs/toy.py [--config.KEY=VALUE ...]")
    mesh = parallel.make_mesh()
    pipe = load_pipeline(cfg.model, dtype=cfg.dtype)
    shape = pipe.latent_shape(cfg.resolution)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    prompts = encode_prompts(pipe, cfg)
    graphdef, trainable, original, frozen = split_for_erase(
        pipe.unet, cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.seed
    )
    optimizer = optax.adam(cfg.learning_rate)
    state = initial_state(trainable, optimizer, cfg.seed)
    inputs, placed = step_inputs(
        mesh, state, frozen, original, prompts, shard_params=cfg.shard_params, frozen_dtype=cfg.frozen_dtype
    )
    state, frozen, original, prompts = jax.device_put(inputs, placed)
    copied = 0 if cfg.lora_rank else nbytes(original)  # a LoRA run's originals are the UNet's own weights
    rows = {
        "trained state": nbytes(state.trainable),
        "copies of the originals": copied,
        "Adam's moments": nbytes(state.opt_state),
        "the UNet's weights, once": nbytes(frozen) + nbytes(original),
    }
    objective, step_fn = make_erase_step(cfg, graphdef, schedule, shape, optimizer, mesh)
    cache = None
    if cfg.trajectories:
        sampler = make_trajectory_sampler(graphdef, schedule, objective, mesh, cfg.trajectories)
        cache = jax.eval_shape(sampler, original, frozen, prompts, state.rng, np.int32(0))
        rows["the fast mode's trajectory cache"] = nbytes(cache)
    programs = step_fn.programs(state, frozen, original, prompts, cache)
    for (fn, args), name in zip(programs, ("pairs", "update"), strict=True):
        memory = fn.lower(*args).compile().memory_analysis()
        peak = memory.argument_size_in_bytes + memory.output_size_in_bytes
        rows[f"peak of the step's {name} program"] = peak - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    for name, n in rows.items():
        print(f"{name:44s}{size(n):>12s}  ({n} bytes)")


if __name__ == "__main__":
    main(sys.argv)
