"""Orbax checkpoints of a run's TrainState, in `<workdir>/checkpoints/<step>`."""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from esd_jax.errors import UserError
from esd_jax.esd import TrainState


def open_manager(
    workdir: Path, *, every: int = 1, keep: int | None = None, read_only: bool = False, config: dict | None = None
):
    """Saves every `every` steps (and when forced), keeping the last `keep`; `read_only` for exports.

    `config`, the run's settings, is stored beside the checkpoints as Orbax metadata.
    """
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        # A fixed interval only: Orbax's default policy would also save the very first step.
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy)
    # Orbax restores only from absolute paths; a workdir is often given relative ("runs/x").
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options, metadata=config)


def restore(manager: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> TrainState:
    """The checkpoint at `step` (default: the latest), placed as `template`'s arrays are."""
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    if step not in steps:
        raise UserError(
            f"{manager.directory}: no checkpoint for step {step}; saved steps: "
            f"{', '.join(map(str, sorted(steps))) or 'none'}"
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
    """Saves asynchronously when the interval (or `force`) says so; the step comes from the state."""
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)
