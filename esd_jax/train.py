"""The erase run: load, split, encode prompts, loop the compiled step, checkpoint, write the delta.

`erase(config)` is what `esd-jax erase` calls. Rerunning the same command resumes from the latest
Orbax checkpoint in the workdir and ends with the same weights as an uninterrupted run.
"""

import contextlib
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from esd_jax import checkpoints, conditioning, lora, parallel, run, weights
from esd_jax.config import RESUMABLE_CHANGES, EraseConfig
from esd_jax.errors import UserError
from esd_jax.esd import Prompts, cache_of, initial_state, make_erase_step, step_inputs
from esd_jax.files import check_writable
from esd_jax.metrics import MetricsLog, plot_loss
from esd_jax.partition import split_for_erase
from esd_jax.pipeline import StableDiffusion, load_pipeline, locate
from esd_jax.robust import robust_inputs
from esd_jax.run import delta_filename, write_delta, write_lora
from esd_jax.schedulers import NoiseSchedule
from esd_jax.trajectories import make_trajectory_sampler

# The losses a step reports (esd.step_loss; robust erasure's inner attack's where the step ran one).
LOSSES = ("loss", "retain_loss", "adversarial_loss", "attack_loss")


def encode_prompts(pipe: StableDiffusion, cfg: EraseConfig) -> Prompts:
    """The concepts, their erase-from prompts, "" and the retain prompts, through the text encoders in one call."""
    texts = [*cfg.concepts, *cfg.erase_froms, "", *cfg.retains]
    cond = pipe.encode(texts, cfg.resolution)
    n, m = len(cfg.concepts), len(cfg.erase_froms)

    def part(start: int, stop: int):
        return jax.tree.map(lambda x: x[start:stop], cond)

    return Prompts(
        concept=part(0, n),
        erase_from=part(n, n + m) if m else None,
        null=conditioning.first(pipe.null(part(n + m, n + m + 1))),
        retain=part(n + m + 1, len(texts)) if cfg.retains else None,
    )


def erase(cfg: EraseConfig) -> Path:
    """Runs (or resumes) an erase; returns the path of the delta safetensors it writes (a LoRA run's: its
    kohya LoRA file)."""
    parallel.initialize_distributed()
    workdir = Path(cfg.workdir).absolute()
    main = parallel.is_main_process()
    model_folder = locate(cfg.model)
    run.check_apart_from_model(workdir, model_folder)
    out_of_memory = (
        f"out of device memory at batch_per_device={cfg.batch_per_device}, resolution={cfg.resolution} "
        "(0: native); lower them, or set shard_params=True on several devices"
    )
    with run.locked(workdir) if main else contextlib.nullcontext(), exhausted_as(out_of_memory):
        return erase_locked(cfg, workdir, main, model_folder)


@contextlib.contextmanager
def exhausted_as(message: str):
    """XLA's RESOURCE_EXHAUSTED (a device memory ran out, compiling or running) as UserError(message), with
    "{xla}" in it replaced by the first line of XLA's."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise UserError(message.replace("{xla}", str(e).splitlines()[0])) from None


def side_by_side(work, items: list[tuple]) -> list:
    """work(*item) for each item, each in a thread of its own; their results. XLA compiles one program on
    about one core, and the step's programs are independent."""
    with ThreadPoolExecutor(len(items)) as pool:
        return [done.result() for done in [pool.submit(work, *item) for item in items]]


def compile_side_by_side(*programs: tuple) -> None:
    """Compiles each (jitted function, arguments) side by side; their calls then find them compiled."""
    side_by_side(lambda f, args: f.lower(*args).compile(), list(programs))


def erase_locked(cfg: EraseConfig, workdir: Path, main: bool, model_folder: Path) -> Path:
    settings = dataclasses.asdict(cfg)
    done = checkpoints.latest_step(workdir)
    defaults = dataclasses.asdict(EraseConfig())
    run.check_erase_workdir(workdir, settings, RESUMABLE_CHANGES, model_folder, done, defaults)
    # What can fail at the end fails now, before the run's work: the delta's name on this file system,
    # and a workdir already past the iterations asked for.
    out = workdir / delta_filename(cfg.concept, cfg.erase_from, cfg.method, cfg.lora_rank)
    if main:
        check_writable(out)
    if done is not None and done > cfg.iterations:
        raise UserError(
            f"workdir {workdir} holds this run at step {done}, past config.iterations={cfg.iterations}; "
            f"pass --config.iterations={done} or more to continue it, or `esd-jax export --workdir {workdir} "
            "--step N` for an earlier checkpoint"
        )
    mesh = parallel.make_mesh()
    global_batch = cfg.batch_per_device * mesh.devices.size
    if cfg.trajectories and cfg.trajectories * cfg.ddim_steps < global_batch:
        raise UserError(
            f"config.trajectories={cfg.trajectories}: {cfg.trajectories * cfg.ddim_steps} pairs, fewer than one "
            f"step's batch of {global_batch}; cache more trajectories"
        )

    pipe = load_pipeline(cfg.model, dtype=cfg.dtype)
    shape = pipe.latent_shape(cfg.resolution)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    prompts = encode_prompts(pipe, cfg)
    adversary, text_graphdef = None, None
    if cfg.robust_every:
        adversarial, adversary, text_graphdef = robust_inputs(
            pipe, cfg.erase_froms or cfg.concepts, cfg.robust_tokens, cfg.seed
        )
        prompts = dataclasses.replace(prompts, adversarial=adversarial)
    unet = pipe.unet
    del pipe  # the VAE (and but for robust erasure the text encoder) is not needed on device from here on

    kinds = weights.layouts(unet)
    graphdef, trainable, original, frozen = split_for_erase(unet, cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    del unet
    if not cfg.lora_rank:
        # Copied first: placing on the mesh may keep a device's buffer, and the step donates the trainable ones.
        original = jax.tree.map(jnp.copy, original)
    optimizer = optax.adam(cfg.learning_rate)
    state = initial_state(trainable, optimizer, cfg.seed, adversary)
    inputs, placed = step_inputs(
        mesh, state, frozen, original, prompts, shard_params=cfg.shard_params, frozen_dtype=cfg.frozen_dtype
    )
    state, frozen, original, prompts = jax.device_put(inputs, placed)

    if main:
        run.write_settings(workdir, settings)
        if done is None:
            run.write_model_files(workdir, model_folder)
    state = checkpoints.restore_latest(workdir, state, main=main)
    manager = checkpoints.open_manager(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    start = int(state.step)

    objective, step_fn = make_erase_step(cfg, graphdef, schedule, shape, optimizer, mesh, text_graphdef)
    cache, cache_index = None, None
    if cfg.trajectories:
        sample_cache = make_trajectory_sampler(graphdef, schedule, objective, mesh, cfg.trajectories)
        if main:
            fresh = f", fresh ones every {cfg.refresh_every} iterations" if cfg.refresh_every else ""
            retained = f", and as many under the {len(cfg.retains)} retain prompt(s)" if cfg.retains else ""
            pairs = cfg.trajectories * cfg.ddim_steps
            print(f"caching {cfg.trajectories} trajectories: {pairs} training pairs{retained}{fresh}")
        index = parallel.place(np.int32(0), mesh)
        cache_shapes = jax.eval_shape(sample_cache, original, frozen, prompts, state.rng, index)
        compile_side_by_side(
            (sample_cache, (original, frozen, prompts, state.rng, index)),
            *step_fn.programs(state, frozen, original, prompts, cache_shapes),
        )
    else:
        compile_side_by_side(*step_fn.programs(state, frozen, original, prompts))

    def cache_for(step: int):
        """The cache that step `step` (counted from 1) trains on, sampled when it changes: from the seed
        alone, so a resumed run samples the one it was using again rather than storing it."""
        nonlocal cache, cache_index
        index = cache_of(step - 1, cfg.refresh_every)[0]
        if cfg.trajectories and index != cache_index:
            cache = None  # its memory goes before the next one is made
            cache = sample_cache(original, frozen, prompts, state.rng, parallel.place(np.int32(index), mesh))
            cache_index = index
        return cache

    log = MetricsLog(workdir / "metrics.jsonl", start) if main else None
    stop = run.StopSignal()
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        desc=f"erasing {cfg.concept!r}",
        unit="it",
        disable=not main,
        dynamic_ncols=True,
    )
    pending: list[tuple[int, dict]] = []  # steps whose metrics are still on the device
    flushed_at = time.perf_counter()

    def flush() -> None:
        """Reads the pending steps' metrics in one transfer, logs them, and stops at a non-finite one."""
        nonlocal flushed_at
        rows = jax.device_get([metrics for _, metrics in pending])
        seconds = (time.perf_counter() - flushed_at) / len(pending)  # the window's mean; the first holds compiling
        for (step, _), row in zip(pending, rows, strict=True):
            if not row["finite"]:
                # The step donated the last state; the newest checkpoint is the last good one.
                last = manager.latest_step()
                what = "loss" if not np.isfinite(row["loss"]) else "weights"
                raise UserError(
                    f"the {what} became non-finite at step {step} (loss {row['loss']}); stopped, keeping the last "
                    f"good checkpoint ({'step ' + str(last) if last is not None else 'none'}): "
                    "try a lower learning_rate (or negative_guidance)"
                )
            if log:
                losses = {key: float(row[key]) for key in LOSSES if key in row and np.isfinite(row[key])}
                log.write({"step": step, **losses, "k": [int(x) for x in row["k"]], "seconds": seconds})
        bar.set_postfix(loss=f"{float(rows[-1]['loss']):.3e}")
        pending.clear()
        flushed_at = time.perf_counter()

    try:
        # Every array the loop touches is on the device already: an implicit transfer is a bug.
        with jax.transfer_guard("disallow"):
            for step in range(start + 1, cfg.iterations + 1):
                state, metrics = step_fn(state, frozen, original, prompts, cache_for(step))
                pending.append((step, metrics))
                bar.update(1)
                # Every checkpoint_every steps, and always at the end or on SIGTERM; the state is checked first.
                save = stop.received or step == cfg.iterations or manager.should_save(step)
                if save or step == start + 1 or len(pending) >= cfg.log_every:
                    flush()
                if save:
                    checkpoints.save(manager, state, force=True)
                if stop.received:
                    break
    finally:
        bar.close()
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        if main and (workdir / "metrics.jsonl").exists():
            plot_loss(workdir / "metrics.jsonl", workdir / "loss.png", f"ESD {cfg.method}: erase {cfg.concept!r}")

    if int(state.step) < cfg.iterations:
        print(f"stopped at step {int(state.step)} of {cfg.iterations} (SIGTERM); the same command resumes")
        return out
    # Sharded trained weights (shard_params) come whole to every host first: every process takes part.
    trained = multihost_utils.process_allgather(state.trainable, tiled=True)
    if main and cfg.lora_rank:
        write_lora(lora.factors(trained, kinds), out, "kohya")
    elif main:
        write_delta(weights.torch_tensors(trained, kinds), out)
    return out
