"""A run's workdir, its one home: what a run leaves there and how it is read back.

<workdir>/config.json          the run's settings (EraseConfig), written atomically
<workdir>/checkpoints/<step>   Orbax checkpoints of the TrainState
<workdir>/metrics.jsonl        one row per step; loss.png drawn from it
<workdir>/esd-*.safetensors    the trained weights in the official ESD repository's format
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from esd_jax import files, weights
from esd_jax.config import EMBEDDED_NAME
from esd_jax.errors import UserError
from esd_jax.files import atomic_file

MODEL_FILES = "model-files.json"  # the base model's files as they were when the run began


def make_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a folder; choose another --config.workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the workdir {workdir}: {e.strerror}") from None


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Holds `<workdir>/.lock` for the run, so that two runs never write one workdir at once.

    The kernel drops the lock when its process dies, kill -9 included, so it never goes stale.
    """
    make_workdir(workdir)
    path = workdir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"workdir {workdir} is in use by process {holder} (a run of esd-jax); wait for it to end, "
                "or give this run another --config.workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings a run stored in `path` (config.json), None if it has none yet."""
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        values = None
    if not isinstance(values, dict):
        raise UserError(
            f"{path} is damaged (not a JSON object), so which run this workdir holds is unknown; "
            "use another workdir, or delete that file if you are sure the run's settings are these"
        )
    return values


def check_same_run(
    workdir: Path, settings: dict[str, Any], resumable: tuple[str, ...], defaults: dict[str, Any] | None = None
) -> None:
    """Refuses a workdir that holds a run of other settings, so runs never mix. A setting the saved run
    does not name (it came with a later esd-jax) had its value in `defaults` then."""
    old = read_settings(workdir / "config.json")
    if old is None:
        return
    then = (defaults or {}) | old
    differ = [k for k in settings if k not in resumable and then.get(k) != settings[k]]
    if differ:
        k = differ[0]
        raise UserError(
            f"workdir {workdir} holds a run with {k}={then.get(k)!r}, not {settings[k]!r}; "
            "use another workdir (or delete that one) to start a new run"
        )


def write_settings(workdir: Path, settings: dict[str, Any]) -> None:
    with atomic_file(workdir / "config.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def check_apart_from_model(workdir: Path, model_folder: Path) -> None:
    """Refuses a workdir that is (or holds, or sits in) the base model's folder, or any diffusers model's."""
    folder = model_folder.resolve()
    here = workdir.resolve()
    if here == folder or folder.is_relative_to(here) or here.is_relative_to(folder):
        raise UserError(f"workdir {workdir} would mix the run with the base model's folder {folder}; use another")
    if (workdir / "model_index.json").exists():
        raise UserError(f"workdir {workdir} holds a diffusers model (model_index.json); use another --config.workdir")


def check_erase_workdir(
    workdir: Path,
    settings: dict[str, Any],
    resumable: tuple[str, ...],
    model_folder: Path,
    done: int | None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuses a workdir whose checkpoints (the latest at step `done`) were made with other settings or from
    a base model whose files have changed since."""
    folder = model_folder.resolve()
    if done is None:
        return  # nothing to resume: a config.json left by a run that never saved is replaced
    saved = read_settings(workdir / "config.json")
    if saved is None or "concept" not in saved:
        raise UserError(
            f"workdir {workdir} holds checkpoints but no esd-jax run's config.json; use another --config.workdir"
        )
    check_same_run(workdir, settings, resumable, defaults)
    then = read_settings(workdir / MODEL_FILES)
    if then is not None and then["files"] != (now := files.fingerprint(model_folder)):
        changed = next(iter(sorted({tuple(f) for f in then["files"]} ^ {tuple(f) for f in now})))[0]
        raise UserError(
            f"the base model's file {folder / changed} changed since this run began, so its checkpoints no "
            f"longer fit it; restore the model, or start the run anew in another workdir"
        )


def write_model_files(workdir: Path, model_folder: Path) -> None:
    """What the base model's files were when the run began, so a resumption can tell they are the same."""
    with atomic_file(workdir / MODEL_FILES) as tmp:
        tmp.write_text(json.dumps({"folder": str(model_folder.resolve()), "files": files.fingerprint(model_folder)}))


class StopSignal:
    """Turns SIGTERM (a TPU preemption notice) into a flag the loop checks between steps."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


# File systems allow 255 bytes a name; the atomic write's temporary adds about 30 to this.
MAX_DELTA_NAME = 200


def delta_filename(concept: str, erase_from: str, method: str, lora_rank: int = 0) -> str:
    """The official esd_sd.py's name: esd-<concept>-from-<erase_from or concept>-<method without '-'>; a LoRA
    run's kohya file adds -lora<rank>.

    A name too long for a file system (a dozen concepts) keeps its start and ends in a hash of the prompts.
    """

    def clean(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", text.strip().replace(" ", "_"))

    kind = method.replace("-", "") + (f"-lora{lora_rank}" if lora_rank else "")
    name = f"esd-{clean(concept)}-from-{clean(erase_from or concept)}-{kind}.safetensors"
    if len(name.encode()) <= MAX_DELTA_NAME:
        return name
    digest = hashlib.sha256(f"{concept}\0{erase_from}".encode()).hexdigest()[:12]
    tail = f"-{digest}-{kind}.safetensors"
    head = name.encode()[: MAX_DELTA_NAME - len(tail)].decode(errors="ignore")
    return head + tail


def write_delta(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Writes diffusers-keyed tensors for `unet.load_state_dict(load_file(path), strict=False)`, atomically."""
    with atomic_file(path) as tmp:
        weights.write_safetensors(tensors, tmp)


def write_lora(found, path: Path, fmt: str, metadata: dict[str, str] | None = None) -> None:
    """Writes lora.Factors as a kohya ("kohya") or diffusers ("diffusers", PEFT names) LoRA file, atomically."""
    from esd_jax import lora

    tensors = lora.kohya_tensors(found) if fmt == "kohya" else lora.peft_tensors(found)
    extra = lora.kohya_metadata(found) if fmt == "kohya" else {}
    with atomic_file(path) as tmp:
        weights.write_safetensors(tensors, tmp, {**extra, **(metadata or {})})


def read_config(workdir: Path):
    """The EraseConfig of the run in `workdir`, or one clear line saying why there is none."""
    from esd_jax.config import EraseConfig

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no erase run (no config.json); pass the --config.workdir of a run")
    values = read_settings(path)
    try:
        cfg = EraseConfig(**values)
        cfg.validate()
    except (TypeError, UserError) as e:
        raise UserError(f"{path} is not the config.json of an esd-jax erase run ({e})") from None
    return cfg


def restore_run(pipe, workdir: Path, *, step: int | None = None):
    """The run's checkpoint at `step` (default: the latest) read back beside `pipe` (None: the run's model,
    loaded): (pipe, its EraseConfig, the step, the trained state, the base values of the trained weights).
    The trained state is an nnx.State of the trained weights, or a LoRA run's lora.Adapters; `pipe` is as
    it was."""
    from esd_jax import checkpoints
    from esd_jax.partition import split_for_erase
    from esd_jax.pipeline import load_pipeline

    cfg = read_config(workdir)
    pipe = load_pipeline(cfg.model) if pipe is None else pipe
    _, trainable, original, _ = split_for_erase(pipe.unet, cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    manager = checkpoints.open_manager(workdir, read_only=True)
    try:
        step = checkpoints.saved_step(manager, step)
        try:
            with checkpoints.quiet_stderr():
                trained = checkpoints.restore_trained(manager, trainable, step)
        except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged file
            raise UserError(
                f"{workdir}: checkpoint step {step} does not read back ({type(e).__name__}); rerunning the "
                "erase command sets it aside and redoes it, or pass --step with an earlier one"
            ) from None
    finally:
        manager.close()
    return pipe, cfg, step, trained, original


def apply_run(pipe, workdir: Path, *, step: int | None = None, strength: float = 1.0):
    """Sets `pipe.unet`'s trained weights to the run's checkpoint at `step` (default: the latest); a LoRA
    run's adapters are merged into the weights they adapt, at `strength` (1: as trained).

    `pipe` None loads the run's model first. Returns (pipe, the run's EraseConfig, the step restored).
    """
    import jax
    from flax import nnx

    from esd_jax import lora
    from esd_jax.esd import trained_weights

    pipe, cfg, step, trained, original = restore_run(pipe, workdir, step=step)
    if isinstance(trained, lora.Adapters):
        merged = lora.merged(original, trained, strength)
    else:
        merged = trained_weights(trained, original)
    nnx.update(pipe.unet, jax.tree.map(lambda w, o: w.astype(o.dtype), merged, original))
    return pipe, cfg, step


def model_name(model: str) -> str:
    """The model as recorded: a local folder's absolute path however it was spelled, else the name."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model != EMBEDDED_NAME and path.exists() else model


def base_model(model: str | None, workdir: Path | None) -> str:
    """The base model of a command given `--model` (or None) and the erase run `workdir` (or None): the
    run's, which `model` may name but not contradict, else `model`, else the embedded toy model."""
    if workdir is not None:
        run_model = read_config(workdir).model
        if model is not None and model_name(model) != model_name(run_model):
            raise UserError(
                f"--model {model} is not the model of run {workdir} ({run_model}), whose weights belong to "
                "that model; leave --model out"
            )
        return run_model
    return EMBEDDED_NAME if model is None else model


def check_erasure(workdir: Path | None, esd: Path | None, strength: float = 1.0) -> None:
    """The erased weights a command was given, at most one of: a run (its checkpoint) or a delta or LoRA file;
    a strength other than 1 only for a LoRA (a LoRA run, or a LoRA file)."""
    from esd_jax import lora

    if workdir is not None and esd is not None:
        raise UserError("give either --workdir (an erase run) or --esd (a delta or LoRA file), not both")
    if esd is not None and not Path(esd).is_file():
        raise UserError(f"--esd {esd}: no such file")
    if workdir is not None:
        cfg = read_config(workdir)
        if strength != 1 and not cfg.lora_rank:
            raise UserError(
                f"--lora_strength {strength:g}: run {workdir} trained full weights, not a LoRA; leave it out, or "
                f"export the run as one (esd-jax export --format lora-kohya --rank R) and pass that with --esd"
            )
    if esd is not None and strength != 1 and not lora.is_lora_file(dict.fromkeys(safetensors_keys(esd))):
        raise UserError(f"--lora_strength {strength:g}: --esd {esd} is a delta file, not a LoRA; leave it out")


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return list(f.keys())
    except Exception:  # safetensors raises bare exceptions for foreign files
        weights.read_safetensors(path)  # its one line says why
        raise


def apply_erasure(
    pipe, workdir: Path | None, esd: Path | None, *, step: int | None = None, strength: float = 1.0
) -> None:
    """Loads the erased weights into `pipe.unet`: the run's checkpoint at `step` (default: the latest), or
    the delta or LoRA file; a LoRA at `strength`."""
    if workdir is not None:
        apply_run(pipe, workdir, step=step, strength=strength)
    else:
        apply_delta(pipe, esd, strength=strength)


def apply_delta(pipe, path: Path, *, strength: float = 1.0) -> None:
    """Loads an official-format ESD delta (a subset of the UNet's weights, diffusers keys) into `pipe.unet`,
    or merges a kohya or diffusers LoRA file into it at `strength` (esd_jax.lora)."""
    import jax.numpy as jnp

    from esd_jax import lora

    tensors = weights.read_safetensors(path)
    if lora.is_lora_file(tensors):
        lora.apply_lora(pipe, path, strength, tensors)
        return
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 included, which numpy does not know
            raise UserError(f"{path}: {key!r} holds {value.dtype} numbers, not weights; is this an ESD delta file?")
        if not np.isfinite(value.astype(np.float32)).all():
            raise UserError(f"{path}: {key!r} holds non-finite values (nan or inf); the erase that wrote it diverged")
    current = weights.state_dict(pipe.unet)
    unknown = sorted(tensors.keys() - current.keys())
    if unknown:
        raise UserError(
            f"{path}: {unknown[0]!r} is not a UNet weight of this model ({len(unknown)} unknown keys); "
            "is the delta for another model, or not an ESD delta file?"
        )
    weights.load_state_dict(pipe.unet, {**current, **tensors}, source=str(path))
