"""Orbax checkpoints of a run's TrainState, in `<workdir>/checkpoints/<step>`."""

import contextlib
import gc
import logging
import os
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from esd_jax.errors import UserError
from esd_jax.esd import TrainState, all_finite


def open_manager(workdir: Path, *, every: int = 1, keep: int | None = None, read_only: bool = False):
    """Saves every `every` steps (and when forced), keeping the last `keep`; `read_only` for exports."""
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        # A fixed interval only: Orbax's default policy would also save the very first step.
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy)
    return ocp.CheckpointManager(checkpoint_folder(workdir), options=options)


def checkpoint_folder(workdir: Path) -> Path:
    # Orbax restores only from absolute paths; a workdir is often given relative ("runs/x").
    folder = Path(workdir).absolute() / "checkpoints"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not Orbax's checkpoint folder; move it away to resume the run")
    return folder


def latest_step(workdir: Path) -> int | None:
    """The newest saved step in `workdir`, from the folder's listing alone: Orbax names a checkpoint by its
    step only once it is complete, and no manager is opened (on a pod that would be a collective, which
    hosts could reach in different numbers)."""
    folder = checkpoint_folder(workdir)
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()] if folder.is_dir() else []
    return max(steps, default=None)


def saved_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    """`step` (default: the latest), if a checkpoint of it is saved; else one line saying which are."""
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{manager.directory}: no checkpoint saved yet; let the run reach one (checkpoint_every)")
    step = manager.latest_step() if step is None else step
    if step not in steps:
        raise UserError(
            f"{manager.directory}: no checkpoint for step {step}; saved steps: {', '.join(map(str, sorted(steps)))}"
        )
    return step


def restore(manager: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> TrainState:
    """The checkpoint at `step` (default: the latest), placed as `template`'s arrays are."""
    step = saved_step(manager, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


@contextlib.contextmanager
def quiet_stderr():
    """Silences what a failing restore prints on its way out (TensorStore's reads fail one by one, each
    with a traceback from Orbax's event loop): the one line that matters is ours."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    level = logging.getLogger("asyncio").level
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()  # the failed reads' orphaned coroutines are finalised now, while quiet
        sys.unraisablehook = hook
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        logging.getLogger("asyncio").setLevel(level)


def restore_latest(workdir: Path, template: TrainState, *, main: bool = True) -> TrainState:
    """The latest checkpoint in `workdir` that reads back whole and finite, else `template`.

    Steps are deterministic, so resuming from an earlier checkpoint ends with the same weights; a
    damaged one is moved to `<workdir>/damaged-checkpoints/` (nothing is deleted) and named on the terminal.
    """
    while (step := latest_step(workdir)) is not None:
        # A fresh manager each time: Orbax infers a checkpoint's layout from the folders it finds.
        manager = open_manager(workdir, read_only=True)
        try:
            with quiet_stderr():
                state = restore(manager, template, step)
            why = None if bool(all_finite(state.trainable)) else "it holds non-finite weights"
        except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged file
            message = str(e).splitlines()[0][:160] if str(e) else ""
            why = f"it does not read back ({type(e).__name__}: {message})"
        finally:
            manager.close()
        if why is None:
            return state
        folder = checkpoint_folder(workdir) / str(step)
        aside = folder.parent.parent / "damaged-checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if main:
            aside.parent.mkdir(exist_ok=True)
            folder.rename(aside)
        if jax.process_count() > 1:  # no host looks again before the folder has moved
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("esd-jax: damaged checkpoint moved")
        print(f"checkpoint step {step} is damaged: {why}; moved it to {aside}, resuming from an earlier one")
    return template


def restore_trained(manager: ocp.CheckpointManager, trainable, step: int):
    """Only the trained weights of the saved checkpoint at `step` (see saved_step), shaped as `trainable`:
    the optimizer state stays on disk, since reading a run back needs no optimizer."""
    item = {"trainable": jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(item, restore_args, partial_restore=True))
    return restored["trainable"]


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
    """Saves asynchronously when the interval (or `force`) says so; the step comes from the state."""
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)
