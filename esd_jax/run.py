"""A run's workdir, its one home: what a run leaves there and how it is read back.

<workdir>/config.json          the run's settings (EraseConfig), written atomically
<workdir>/checkpoints/<step>   Orbax checkpoints of the TrainState
<workdir>/metrics.jsonl        one row per step; loss.png drawn from it
<workdir>/esd-*.safetensors    the trained weights in the official ESD repository's format
"""

import json
from pathlib import Path

from esd_jax import weights
from esd_jax.errors import UserError


def read_config(workdir: Path):
    """The EraseConfig of the run in `workdir`, or one clear line saying why there is none."""
    from esd_jax.config import EraseConfig

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no erase run (no config.json); pass the --config.workdir of a run")
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); the file is damaged: rerun the erase command") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a run's settings (a JSON object); rerun the erase command")
    try:
        return EraseConfig(**values)
    except TypeError as e:
        raise UserError(f"{path} is not an esd-jax erase run's config.json ({e})") from None


def apply_run(pipe, workdir: Path, *, step: int | None = None):
    """Sets `pipe.unet`'s trained weights to the run's checkpoint at `step` (default: the latest).

    `pipe` None loads the run's model first. Returns (pipe, the run's EraseConfig, the step restored).
    """
    import optax
    from flax import nnx

    from esd_jax import checkpoints
    from esd_jax.esd import initial_state
    from esd_jax.partition import trainable_filter
    from esd_jax.pipeline import load_pipeline

    cfg = read_config(workdir)
    pipe = load_pipeline(cfg.model) if pipe is None else pipe
    _, trainable, _ = nnx.split(pipe.unet, trainable_filter(pipe.unet, cfg.method), ...)
    manager = checkpoints.open_manager(workdir, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        state = checkpoints.restore(manager, initial_state(trainable, optax.adam(cfg.learning_rate), cfg.seed), step)
    finally:
        manager.close()
    nnx.update(pipe.unet, state.trainable)
    return pipe, cfg, int(state.step)


def apply_delta(pipe, path: Path) -> None:
    """Loads an official-format ESD delta (a subset of the UNet's weights, diffusers keys) into `pipe.unet`."""
    tensors = weights.read_safetensors(path)
    current = weights.state_dict(pipe.unet)
    unknown = sorted(tensors.keys() - current.keys())
    if unknown:
        raise UserError(
            f"{path}: {unknown[0]!r} is not a UNet weight of this model ({len(unknown)} unknown keys); "
            "is the delta for another model, or not an ESD delta file?"
        )
    weights.load_state_dict(pipe.unet, {**current, **tensors}, source=str(path))
