"""Erase runs end to end: outputs, resumption after SIGTERM or a kill, multi-host, bad input."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import esd_jax
from esd_jax import run, weights
from esd_jax.cli import main
from esd_jax.config import EraseConfig, default_config
from esd_jax.errors import UserError
from esd_jax.export import export_run
from esd_jax.metrics import MetricsLog
from esd_jax.partition import trainable_keys
from esd_jax.run import apply_run, delta_filename
from esd_jax.train import erase

ITERATIONS = 4
DELTA = "esd-red_circle_van_gogh-from-red_circle_van_gogh-esdx.safetensors"


def settings(model: Path, workdir: Path, **overrides) -> dict:
    return (
        dict(
            model=str(model),
            concept="red circle|van gogh",
            method="esd-x",
            iterations=ITERATIONS,
            learning_rate=1e-3,
            ddim_steps=4,
            checkpoint_every=2,
            seed=3,
            workdir=str(workdir),
        )
        | overrides
    )


def config(**values) -> EraseConfig:
    cfg = default_config()
    cfg.update(values)
    return EraseConfig.from_config_dict(cfg)


def cli_args(values: dict) -> list[str]:
    return ["erase", "--config", "configs/esd_x.py", *(f"--config.{k}={v}" for k, v in values.items())]


def esd_jax_cli(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """`esd-jax ARGS` in a fresh process with the 4 CPU devices this test process has."""
    return subprocess.Popen(
        [sys.executable, "-m", "esd_jax.cli", *args],
        cwd=Path(__file__).parents[1],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def reference_run(sd1_folder, tmp_path_factory):
    """One uninterrupted run in this process (4 devices, 1 sample each)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    delta = erase(config(**settings(sd1_folder, workdir)))
    return workdir, load_file(delta)


def test_run_leaves_delta_metrics_plot_config_and_checkpoints(sd1_folder, reference_run, tmp_path, monkeypatch):
    workdir, delta = reference_run
    assert (workdir / DELTA).is_file()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert all(r["loss"] > 0 and len(r["k"]) == 4 and all(0 <= k < 4 for k in r["k"]) for r in rows)
    assert (workdir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((workdir / "config.json").read_text())["concept"] == "red circle|van gogh"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

    # The delta holds exactly the trained parameters; the exported folder carries them, the rest untouched.
    original = esd_jax.load_pipeline(sd1_folder)
    keys = trainable_keys(original.unet, "esd-x")
    assert set(delta) == keys
    monkeypatch.chdir(workdir.parent)  # a workdir given relative, as on the command line
    export_run(Path(workdir.name), tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors")
    before = weights.state_dict(original.unet)
    for key, value in before.items():
        if key in keys:
            assert np.array_equal(exported[key], delta[key]) and not np.array_equal(value, delta[key]), key
        else:
            assert np.array_equal(exported[key], value), key


def test_extending_a_finished_run_equals_running_longer(sd1_folder, reference_run, tmp_path):
    _, delta = reference_run
    erase(config(**settings(sd1_folder, tmp_path, iterations=2)))
    resumed = load_file(erase(config(**settings(sd1_folder, tmp_path))))
    assert all(np.array_equal(resumed[k], delta[k]) for k in delta)


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(sd1_folder, reference_run, tmp_path):
    _, delta = reference_run
    erase(config(**settings(sd1_folder, tmp_path, iterations=2)))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["frozen_dtype"]  # as an esd-jax from before frozen_dtype wrote it
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resumed = load_file(erase(config(**settings(sd1_folder, tmp_path))))
    assert all(np.array_equal(resumed[k], delta[k]) for k in delta)
    with pytest.raises(UserError, match="holds a run with frozen_dtype='float32', not 'bfloat16'"):
        erase(config(**settings(sd1_folder, tmp_path, iterations=6, frozen_dtype="bfloat16")))


def test_sharded_weights_and_optimizer_state_give_the_same_weights(sd1_folder, reference_run, tmp_path):
    _, delta = reference_run
    sharded = load_file(erase(config(**settings(sd1_folder, tmp_path, shard_params=True))))
    for key in delta:
        np.testing.assert_allclose(sharded[key], delta[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_fast_mode_with_sharded_bfloat16_weights_trains_as_with_replicated_ones(sd1_folder, tmp_path):
    """FSDP (each layer gathering its weights where it uses them) changes where the weights are, not what
    the step computes; bfloat16 storage of the frozen weights moves the result by their rounding only."""
    fast = dict(trajectories=3, frozen_dtype="bfloat16")
    replicated = load_file(erase(config(**settings(sd1_folder, tmp_path / "replicated", **fast))))
    sharded = load_file(erase(config(**settings(sd1_folder, tmp_path / "sharded", **fast, shard_params=True))))
    full = load_file(erase(config(**settings(sd1_folder, tmp_path / "float32", trajectories=3))))
    for key in replicated:
        np.testing.assert_allclose(sharded[key], replicated[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(replicated[key], full[key], rtol=0.05, atol=2e-3)
    with pytest.raises(UserError, match="config.frozen_dtype='float16': choose one of float32, bfloat16"):
        config(**settings(sd1_folder, tmp_path, frozen_dtype="float16"))


def wait_for_steps(workdir: Path, n: int, process: subprocess.Popen, timeout: float = 300) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_weights(sd1_folder, reference_run, tmp_path, sig):
    _, delta = reference_run
    values = settings(sd1_folder, tmp_path, checkpoint_every=1)
    process = esd_jax_cli(cli_args(values))
    wait_for_steps(tmp_path, 1, process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    if sig == signal.SIGTERM:
        assert process.returncode == 0, err
        assert "the same command resumes" in out or (tmp_path / DELTA).exists()  # it may have just finished
        assert (tmp_path / "checkpoints").is_dir()
    else:
        assert process.returncode == -signal.SIGKILL
    process = esd_jax_cli(cli_args(values))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    resumed = load_file(tmp_path / DELTA)
    assert all(np.array_equal(resumed[k], delta[k]) for k in delta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_result_of_one(sd1_folder, reference_run, tmp_path):
    """jax.distributed on localhost, 2 processes x 2 CPU devices, against 1 process x 4 devices."""
    _, delta = reference_run
    port = free_port()
    flags = os.environ["XLA_FLAGS"].replace("device_count=4", "device_count=2")
    processes = [
        esd_jax_cli(
            cli_args(settings(sd1_folder, tmp_path)),
            env={
                "XLA_FLAGS": flags,
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    for p in processes:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
    multi = load_file(tmp_path / DELTA)
    for key in delta:
        np.testing.assert_allclose(multi[key], delta[key], rtol=1e-5, atol=1e-6)


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(sd1_folder, tmp_path):
    # At this learning rate the first step's loss is finite and its update overflows the weights.
    with pytest.raises(UserError, match=r"the (loss|weights) became non-finite at step \d .*keeping the last good"):
        erase(config(**settings(sd1_folder, tmp_path, learning_rate=1e38, checkpoint_every=1, iterations=6)))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [r["step"] for r in rows] and all(np.isfinite(r["loss"]) for r in rows)
    if steps:
        pipe, _, step = apply_run(None, tmp_path)
        assert step == steps[-1]
        assert all(np.isfinite(v).all() for v in weights.state_dict(pipe.unet).values())


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    sd1_folder, reference_run, tmp_path, capsys
):
    _, delta = reference_run
    values = settings(sd1_folder, tmp_path)
    erase(config(**values))
    for data in (tmp_path / "checkpoints" / "4").rglob("d/*"):  # writes cut short: every array's data
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match="checkpoint step 4 does not read back .*; rerunning the erase command"):
        export_run(tmp_path, tmp_path / "exported")
    resumed = load_file(erase(config(**values)))
    out = capsys.readouterr()
    assert "checkpoint step 4 is damaged: it does not read back" in out.out
    assert "Traceback" not in out.err
    [aside] = (tmp_path / "damaged-checkpoints").iterdir()
    assert aside.name.startswith("4-") and (aside / "default").is_dir()
    assert all(np.array_equal(resumed[k], delta[k]) for k in delta)


def test_iterations_below_the_steps_done_are_refused_and_the_delta_kept(sd1_folder, reference_run):
    workdir, _ = reference_run
    before = (workdir / DELTA).stat().st_mtime_ns
    with pytest.raises(UserError, match=f"holds this run at step {ITERATIONS}, past config.iterations=2; pass"):
        erase(config(**settings(sd1_folder, workdir, iterations=2)))
    assert (workdir / DELTA).stat().st_mtime_ns == before


def test_a_workdir_in_use_is_refused_naming_the_process(sd1_folder, tmp_path):
    with run.locked(tmp_path):
        with pytest.raises(UserError, match=f"workdir {tmp_path} is in use by process {os.getpid()}"):
            erase(config(**settings(sd1_folder, tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda w: w.write_text("x"), "is a file, not a folder; choose another --config.workdir"),
        (
            lambda w: ((w / "checkpoints" / "2").mkdir(parents=True), (w / "config.json").write_text('{"model": "m"')),
            "config.json is damaged",
        ),
        (lambda w: (w / "checkpoints" / "2").mkdir(parents=True), "holds checkpoints but no esd-jax run's config"),
        (lambda w: (w.mkdir(), (w / "model_index.json").write_text("{}")), "holds a diffusers model"),
        (lambda w: (w.mkdir(), (w / "checkpoints").write_text("x")), "is a file, not Orbax's checkpoint folder"),
    ],
)
def test_damaged_workdirs_are_refused_in_one_line(sd1_folder, tmp_path, setup, message):
    workdir = tmp_path / "run"
    setup(workdir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match=message) as e:
        erase(config(**settings(sd1_folder, workdir)))
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_torn_metrics_log_loses_only_its_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    MetricsLog(path, resume_step=2)
    assert [r["step"] for r in MetricsLog.read_rows(path)] == [1, 2]
    assert path.read_text().endswith("}\n")


def test_delta_names_stay_within_file_system_limits():
    assert delta_filename("Van Gogh", "", "esd-x") == "esd-Van_Gogh-from-Van_Gogh-esdx.safetensors"
    artists = "|".join(f"Painter Number {i} of the Dutch Golden Age" for i in range(11))
    name = delta_filename(artists, "", "esd-x")
    assert len(name.encode()) <= 200 and name.startswith("esd-Painter_Number_0") and name.endswith("-esdx.safetensors")
    assert name != delta_filename(artists + "|one more", "", "esd-x")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"concept": ""}, "config.concept='': give the concept to erase"),
        ({"method": "esd-q"}, "config.method='esd-q': unknown method; choose one of esd-x, esd-x-strict"),
        ({"iterations": 0}, "config.iterations=0: must be a positive integer"),
        ({"learning_rate": 0.0}, "config.learning_rate=0.0: must be a positive finite number"),
        ({"learning_rate": float("inf")}, "config.learning_rate=inf: must be a positive finite number"),
        ({"negative_guidance": float("nan")}, "config.negative_guidance=nan: eta must be a finite number >= 0"),
        ({"negative_guidance": -1.0}, "config.negative_guidance=-1.0: eta must be a finite number >= 0"),
        ({"start_guidance": float("nan")}, "config.start_guidance=nan: the guidance scale must be a finite"),
        ({"seed": 2**40}, "config.seed=1099511627776: seeds are 32-bit: 0..4294967295"),
        ({"dtype": "float16"}, "config.dtype='float16': choose one of float32, bfloat16 (float16 underflows"),
        ({"learning_rate": 1e39}, "config.learning_rate=1e+39: must be a positive finite number"),
        ({"negative_guidance": 1e39}, "config.negative_guidance=1e+39: eta must be a finite number >= 0"),
        ({"erase_from": "a|"}, "config.erase_from='a|': an erase-from prompt is empty"),
        ({"model": " "}, "config.model=' ': give a diffusers folder, a hub id, or toy"),
        ({"resolution": 5000}, "config.resolution=5000: give a number of pixels up to 4096"),
        ({"erase_from": "a|b|c"}, "give one prompt, or one per concept (2)"),
        ({"retain": "a green square|"}, "config.retain='a green square|': a retain prompt is empty"),
        ({"retain_weight": -0.5}, "config.retain_weight=-0.5: give a finite weight >= 0"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config(**(settings(Path("m"), Path("w")) | overrides))


def test_bad_resolution_and_foreign_workdir_are_refused(sd1_folder, reference_run, tmp_path):
    with pytest.raises(UserError, match=r"resolution 18: this model takes multiples of 4 pixels \(native: 16\)"):
        erase(config(**settings(sd1_folder, tmp_path, resolution=18)))
    workdir, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != ".lock"}
    with pytest.raises(UserError, match="holds a run with concept='red circle|van gogh', not 'green'"):
        erase(config(**settings(sd1_folder, workdir, concept="green")))
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != ".lock"} == before


def test_cli_reports_bad_input_in_one_line(tmp_path):
    for args, message in [
        (["erase", "--config", "configs/esd_x.py", "--config.nonsense=1"], "bad flag or config override (nonsense)"),
        (["erase", "--config", "configs/missing.py"], "cannot load the config file 'configs/missing.py'"),
        (["erase", "--config", "configs/esd_x.py", "--config.concept=x", "--config.method=bad"], "unknown method"),
        (["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")], "holds no erase run"),
        (["export", "--workdir", str(tmp_path)], "give --out: esd-jax export --workdir RUN --out FOLDER"),
    ]:
        out, err = esd_jax_cli(args).communicate(timeout=120)
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_help_lists_every_config_key():
    out, _ = esd_jax_cli(["erase", "--help"]).communicate(timeout=120)
    for key in ml_collections.ConfigDict(default_config()).keys():
        assert f"--config.{key}=" in out


@pytest.mark.parametrize(
    "text, message",
    [
        (b"\x00\x01binary", "SyntaxError: source code string cannot contain null bytes"),
        (b"import no_such_module_here\n", "ModuleNotFoundError: No module named 'no_such_module_here'"),
        (b"x = 1\n", "AttributeError: module 'esd_jax_user_config' has no attribute 'get_config'"),
        (b"def get_config():\n    return 5\n", "get_config() returned a int, not a ConfigDict"),
    ],
)
def test_config_files_that_do_not_load_get_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "config.py"
    path.write_bytes(text)
    assert main(["esd-jax", "erase", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_local_model_is_stored_as_an_absolute_folder(sd1_folder, monkeypatch):
    monkeypatch.chdir(sd1_folder.parent)
    assert config(**settings(Path(sd1_folder.name), Path("w"))).model == str(sd1_folder.resolve())
    assert config(**settings(Path("toy"), Path("w"))).model == "toy"


@pytest.mark.parametrize("inside", ["", "unet"])
def test_a_workdir_in_the_model_folder_is_refused(sd1_folder, tmp_path, inside):
    model = tmp_path / "model"
    shutil.copytree(sd1_folder, model)
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    with pytest.raises(UserError, match="would mix the run with the base model's folder"):
        erase(config(**settings(model, model / inside)))
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*") if p.name != ".lock"} == before


def test_out_of_memory_is_one_line(sd1_folder, tmp_path, monkeypatch):
    from esd_jax import train

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 TiB.")

    monkeypatch.setattr(train, "erase_locked", exhausted)
    with pytest.raises(UserError, match="out of device memory at batch_per_device=1, resolution=0"):
        erase(config(**settings(sd1_folder, tmp_path)))


def test_stray_arguments_and_unknown_commands_are_refused(capsys):
    assert main(["esd-jax", "info", "--model", "toy", "extra"]) == 2
    assert "unexpected argument 'extra'" in capsys.readouterr().err
    assert main(["esd-jax", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'frobnicate'; choose one of erase" in err


@pytest.mark.slow
def test_the_fast_mode_resumes_to_the_weights_of_one_run(sd1_folder, tmp_path):
    """A cached run with retain prompts extended from 2 to 4 iterations equals 4 at once: the cache comes
    back from the seed. Its metrics hold both losses, and the k of its erase and retain rows."""
    fast = dict(trajectories=3, checkpoint_every=1, retain="a green circle|a photo")
    once = load_file(erase(config(**settings(sd1_folder, tmp_path / "once", **fast))))
    rows = MetricsLog.read_rows(tmp_path / "once" / "metrics.jsonl")
    assert all(len(r["k"]) == 2 * jax.device_count() for r in rows) and all(r["retain_loss"] > 0 for r in rows[1:])
    erase(config(**settings(sd1_folder, tmp_path / "twice", **fast, iterations=2)))
    resumed = load_file(erase(config(**settings(sd1_folder, tmp_path / "twice", **fast))))
    assert all(np.array_equal(resumed[k], once[k]) for k in once)
    with pytest.raises(UserError, match="cache only with xt_model='frozen'"):
        config(**settings(sd1_folder, tmp_path, trajectories=3, xt_model="trainable"))


@pytest.mark.slow
def test_fresh_caches_resume_to_the_weights_of_one_run(sd1_folder, tmp_path):
    """Resumed inside the second cache (step 3 of refresh_every=2), a run samples that cache again and
    ends where one uninterrupted run does; fresh caches train to other weights than one cache."""
    fast = dict(trajectories=2, refresh_every=2, checkpoint_every=1)
    once = load_file(erase(config(**settings(sd1_folder, tmp_path / "once", **fast))))
    erase(config(**settings(sd1_folder, tmp_path / "twice", **fast, iterations=3)))
    resumed = load_file(erase(config(**settings(sd1_folder, tmp_path / "twice", **fast))))
    assert all(np.array_equal(resumed[k], once[k]) for k in once)
    one_cache = load_file(erase(config(**settings(sd1_folder, tmp_path / "one", trajectories=2))))
    assert any(not np.allclose(one_cache[k], once[k], rtol=1e-4) for k in once)
    with pytest.raises(UserError, match="config.refresh_every=2: .* with config.trajectories > 0"):
        config(**settings(sd1_folder, tmp_path, refresh_every=2))


def test_the_cli_keeps_compiled_programs_in_the_user_cache(monkeypatch, tmp_path):
    """The persistent compilation cache: under XDG_CACHE_HOME by default, where the user says otherwise."""
    from esd_jax.cli import use_compilation_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "esd-jax" / "xla")
    assert int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]) == 4 * 2**30
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")
