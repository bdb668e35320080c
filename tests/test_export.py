"""Exports never write over the run, the base model or anything esd-jax export did not write itself."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from esd_jax.cli import main
from esd_jax.config import EraseConfig, default_config
from esd_jax.errors import UserError
from esd_jax.export import STAMP, export_run
from esd_jax.train import erase


@pytest.fixture(scope="module")
def run(sd1_folder, tmp_path_factory):
    """A two-step run whose base model is a copy this module may see changed (or not)."""
    root = tmp_path_factory.mktemp("export")
    model = root / "model"
    shutil.copytree(sd1_folder, model)
    cfg = default_config()
    cfg.update(
        dict(model=str(model), concept="red", iterations=2, ddim_steps=2, checkpoint_every=1, workdir=str(root / "run"))
    )
    erase(EraseConfig.from_config_dict(cfg))
    return root / "run", model


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(
    "out, fmt, message",
    [
        (lambda run, model: run, "diffusers", "would write over the run's checkpoints"),
        (lambda run, model: run.parent, "diffusers", "would write over the run's checkpoints"),
        (lambda run, model: run / "checkpoints" / "x", "diffusers", "would write over the run's checkpoints"),
        (lambda run, model: model, "diffusers", "would write over the run's base model"),
        (lambda run, model: model / "unet", "diffusers", "would write over the run's base model"),
        (lambda run, model: model / "m.safetensors", "single-file", "would write over the run's base model"),
    ],
)
def test_outputs_over_the_run_or_its_model_are_refused(run, capsys, out, fmt, message):
    workdir, model = run
    before = snapshot(workdir.parent)
    target = out(workdir, model)
    assert main(["esd-jax", "export", "--workdir", str(workdir), "--out", str(target), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert snapshot(workdir.parent) == before


def test_only_an_earlier_export_is_replaced(run, tmp_path):
    workdir, _ = run
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"not ours")
    with pytest.raises(UserError, match=f"--out {foreign} is a folder esd-jax export did not write"):
        export_run(workdir, foreign)
    assert (foreign / "holiday.png").read_bytes() == b"not ours"

    out = tmp_path / "exported"
    export_run(workdir, out)
    assert (out / STAMP).is_file() and (out / "model_index.json").is_file()
    export_run(workdir, out, step=1)  # an export of its own is replaced
    assert '"step": 1' in (out / STAMP).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    checkpoint = tmp_path / "downloaded.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(UserError, match="is a file esd-jax export did not write"):
        export_run(workdir, checkpoint, fmt="single-file")
    assert checkpoint.read_bytes() == before
    single = tmp_path / "erased.safetensors"
    export_run(workdir, single, fmt="single-file")
    export_run(workdir, single, fmt="single-file")  # its own file is replaced


def test_exports_of_other_runs_and_impossible_outputs_are_refused_before_loading(run, tmp_path, sd1_folder):
    workdir, _ = run
    other = tmp_path / "other-run-export"
    other.mkdir()
    (other / STAMP).write_text('{"workdir": "/somewhere/else", "step": 1}')
    with pytest.raises(UserError, match="holds an export of another run"):
        export_run(workdir, other)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        export_run(workdir, blocker / "sub" / "out")
    with pytest.raises(UserError, match="is a file; a diffusers export is a folder"):
        export_run(workdir, blocker)


def test_a_resumption_from_a_changed_base_model_is_refused(run):
    workdir, model = run
    changed = model / "scheduler" / "scheduler_config.json"
    before = changed.stat()
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        values = json.loads((workdir / "config.json").read_text()) | {"iterations": 3}
        with pytest.raises(UserError, match=f"the base model's file {changed} changed since this run began"):
            erase(EraseConfig(**values))
    finally:
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
