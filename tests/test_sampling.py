"""Sampling against diffusers' StableDiffusionPipeline on the same weights; devices, batches, CSVs, the
records of what made each image, the CLI."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from jax.sharding import Mesh
from PIL import Image

import esd_jax
from conftest import build_torch_pipeline
from esd_jax import weights
from esd_jax.cli import main
from esd_jax.config import EraseConfig, SampleConfig, default_config
from esd_jax.errors import UserError
from esd_jax.files import fingerprint
from esd_jax.partition import trainable_keys
from esd_jax.run import apply_delta, write_delta
from esd_jax.sampling import folder
from esd_jax.sampling.folder import sample_to_folder as sample_config_to_folder
from esd_jax.sampling.prompts import read_prompts_csv
from esd_jax.sampling.record import FOLDER_KEYS
from esd_jax.sampling.sampler import Sampler, initial_noise, sample_with_latents, to_uint8
from esd_jax.train import erase

PROMPTS = ["red circle", "a photo of van gogh painting"]
SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def mesh(n: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:n]), ("data",))


@pytest.fixture(scope="module")
def sd1_pipe(sd1_folder):
    return esd_jax.load_pipeline(sd1_folder)


@pytest.mark.parametrize("scheduler,steps", [("ddim", 10), ("dpm++", 8)])
def test_sampling_matches_diffusers(tiny_pipeline, scheduler, steps):
    """Same weights, same initial latents: the final latents and the decoded images agree."""
    folder, ref = tiny_pipeline
    # As a user builds it from the saved folder: `Scheduler.from_config(pipe.scheduler.config)`.
    config = DDIMScheduler.load_config(folder / "scheduler")
    ref = type(ref)(**{**ref.components, "scheduler": SCHEDULERS[scheduler].from_config(config)})
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    final = {}

    def capture(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    with torch.no_grad():
        want = ref(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=7.5,
            latents=torch.tensor(noise),
            output_type="np",
            callback_on_step_end=capture,
        ).images
    want_latents = final["latents"].numpy()

    images, latents = sample_with_latents(
        esd_jax.load_pipeline(folder),
        PROMPTS,
        latents=noise,
        steps=steps,
        scheduler=scheduler,
        mesh=mesh(1),
        batch_size=2,
    )
    assert np.abs(latents - want_latents).max() <= 1e-3 * np.abs(want_latents).max()
    np.testing.assert_allclose(images, want, atol=1e-4)


def test_initial_noise_follows_the_documented_rule():
    got = initial_noise(jnp.asarray([7, 2**32 - 1], jnp.uint32), jnp.asarray([3, 0]), shape=(4, 8, 8))
    for row, (seed, index) in enumerate([(7, 3), (2**32 - 1, 0)]):
        want = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), (4, 8, 8))
        # The same random bits; the float maths that makes them normal may round otherwise in a batch.
        np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want), rtol=0, atol=1e-6)


def test_images_do_not_depend_on_devices_or_batch_size(sd1_pipe):
    """One device with batches of 3 against four devices with one image each (plus padding)."""
    args = dict(prompts=["red circle", "green", "van gogh"], seeds=[1, 2, 3], num_per_prompt=2, steps=4)
    one = sample_with_latents(sd1_pipe, **args, mesh=mesh(1), batch_size=3)
    four = sample_with_latents(sd1_pipe, **args, mesh=mesh(4), batch_size=1)
    # Other batch shapes run other kernels: the same up to float rounding, which can flip a pixel's
    # rounding to 8 bits. The tolerance docs/sampling.md states: one level, on at most 1% of the pixels.
    np.testing.assert_allclose(four[1], one[1], rtol=0, atol=1e-5 * np.abs(one[1]).max())
    four_pixels, one_pixels = (to_uint8(images).astype(int) for images in (four[0], one[0]))
    assert np.abs(four_pixels - one_pixels).max() <= 1
    assert np.mean(four_pixels != one_pixels) <= 0.01
    # Each image differs from the others: the seeds and the per-prompt index both reach the noise.
    assert len({im.tobytes() for im in to_uint8(one[0])}) == 6


def sample_to_folder(**settings) -> int:
    """`esd-jax sample` with these options (paths given as Path)."""
    return sample_config_to_folder(
        SampleConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})
    )


def write_csv(path, text: str):
    path.write_text(text)
    return path


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time, to show that nothing was touched."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(args: list[str], capsys) -> str:
    """The one error line of `esd-jax sample ARGS`, which must exit with 2."""
    capsys.readouterr()
    assert main(["esd-jax", "sample", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_an_interrupted_run_continues_with_the_missing_images_only(sd1_folder, tmp_path):
    csv = write_csv(
        tmp_path / "prompts.csv",
        "case_number,prompt,evaluation_seed,evaluation_guidance\n"
        "3,red circle,11,7.5\n5,green,12,7.5\n9,van gogh,13,7\n",
    )
    out = tmp_path / "out"
    settings = dict(model=str(sd1_folder), prompts=csv, out=out, steps=4, num_per_prompt=2, batch_size=4)
    assert sample_to_folder(**settings) == 6
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["3_0.png", "3_1.png", "5_0.png", "5_1.png", "9_0.png", "9_1.png"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    pixels = {name: np.asarray(Image.open(out / name)) for name in names}
    (out / "5_1.png").unlink()
    (out / "9_0.png").unlink()

    assert sample_to_folder(**settings) == 2
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(after) == names
    assert [n for n in names if after[n] != before[n]] == ["5_1.png", "9_0.png"]
    for name in ("5_1.png", "9_0.png"):  # remade exactly: the same seed, index and settings
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), pixels[name])
    assert not list(out.glob(".*"))  # no temporary files left behind

    with pytest.raises(UserError, match="holds images sampled with steps=4, not 5"):
        sample_to_folder(**{**settings, "steps": 5})


def test_a_rerun_remakes_exactly_the_images_whose_row_changed_or_that_have_no_record(
    sd1_folder, sd1_pipe, tmp_path, capsys
):
    csv = write_csv(
        tmp_path / "p.csv", "case_number,prompt,evaluation_seed\n3,red circle,11\n5,green,12\n9,van gogh,13\n"
    )
    out = tmp_path / "out"
    settings = dict(model=str(sd1_folder), prompts=csv, out=out, steps=4, batch_size=4)
    assert sample_to_folder(**settings) == 3
    record = json.loads((out / "sample.json").read_text())
    assert record["images"] == {
        "3_0.png": {"prompt": "red circle", "seed": 11, "index": 0},
        "5_0.png": {"prompt": "green", "seed": 12, "index": 0},
        "9_0.png": {"prompt": "van gogh", "seed": 13, "index": 0},
    }
    assert record["settings"]["model"] == str(sd1_folder.resolve())
    assert record["settings"]["model_files"] == fingerprint(sd1_folder)
    assert "scheduler/scheduler_config.json" in [f[0] for f in record["settings"]["model_files"]]
    assert Image.open(out / "3_0.png").info["Software"] == "esd-jax sample"  # the mark of esd-jax's own files
    kept = snapshot(out)["3_0.png"]

    # Row 5's prompt and row 9's seed edited; a new row 7 whose image file was copied in from elsewhere.
    write_csv(
        csv, "case_number,prompt,evaluation_seed\n3,red circle,11\n5,a photo of green,12\n9,van gogh,14\n7,red,15\n"
    )
    shutil.copy(out / "3_0.png", out / "7_0.png")
    capsys.readouterr()
    assert sample_to_folder(**settings) == 3
    printed = capsys.readouterr().out
    assert f"{out}: remaking 2 images made from another prompt or seed" in printed
    assert f"{out}: remaking 1 image that {out / 'sample.json'} has no record of" in printed
    assert snapshot(out)["3_0.png"] == kept
    fresh = esd_jax.sample(sd1_pipe, ["a photo of green", "van gogh", "red"], seeds=[12, 14, 15], steps=4, batch_size=4)
    for name, image in zip(["5_0.png", "9_0.png", "7_0.png"], fresh, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), image)
    assert json.loads((out / "sample.json").read_text())["images"]["7_0.png"] == {
        "prompt": "red",
        "seed": 15,
        "index": 0,
    }
    assert sample_to_folder(**settings) == 0  # all on record now


class Killed(Exception):
    pass


def test_a_killed_run_leaves_records_only_of_the_images_it_wrote(sd1_folder, tmp_path, monkeypatch):
    header = "case_number,prompt,evaluation_seed\n"
    csv = write_csv(tmp_path / "p.csv", header + "3,red circle,11\n5,green,12\n")
    out = tmp_path / "out"
    settings = dict(model=str(sd1_folder), prompts=csv, out=out, steps=4, batch_size=4)
    assert sample_to_folder(**settings) == 2

    def kill_at_batch(n: int):
        calls = []

        def convert(images):
            calls.append(1)
            if len(calls) == n:
                raise Killed
            return to_uint8(images)

        monkeypatch.setattr(folder, "to_uint8", convert)
        with pytest.raises(Killed):
            sample_to_folder(**settings)

    def recorded() -> dict[str, str]:
        return {name: r["prompt"] for name, r in json.loads((out / "sample.json").read_text())["images"].items()}

    # Row 5 edited, four rows added: batches of 4 and 1. Killed in the first: row 5's old image is still
    # there, but no longer on record, so the old prompt back would not trust it.
    write_csv(csv, header + "3,red circle,11\n5,van gogh,12\n7,red,1\n9,green,2\n11,red,3\n13,green,4\n")
    kill_at_batch(1)
    assert recorded() == {"3_0.png": "red circle"} and (out / "5_0.png").exists()
    # Killed in the second: the first batch's images are on record, and only the images present are.
    kill_at_batch(2)
    first_batch = {"5_0.png": "van gogh", "7_0.png": "red", "9_0.png": "green", "11_0.png": "red"}
    assert recorded() == {"3_0.png": "red circle", **first_batch}
    assert sorted(recorded()) == sorted(p.name for p in out.glob("*.png"))


def erase_run(model, workdir, iterations: int) -> None:
    cfg = default_config()
    cfg.update(
        model=str(model),
        concept="red circle",
        iterations=iterations,
        learning_rate=1e-3,
        ddim_steps=2,
        checkpoint_every=1,
        workdir=str(workdir),
    )
    erase(EraseConfig.from_config_dict(cfg))


def test_images_of_an_earlier_checkpoint_or_for_another_model_are_refused(sd1_folder, tmp_path, capsys, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "out"
    erase_run(sd1_folder, run, iterations=2)
    args = ["--workdir", str(run), "--prompt", "red circle", "--steps", "4", "--batch_size", "4", "--out", str(out)]
    assert main(["esd-jax", "sample", *args]) == 0
    settings = json.loads((out / "sample.json").read_text())["settings"]
    assert (settings["workdir"], settings["checkpoint_step"]) == (str(run.resolve()), 2)
    assert settings["checkpoint_files"] == fingerprint(run / "checkpoints" / "2") != []
    before = snapshot(out)

    # The run redone in the same workdir: the same step, other weights.
    shutil.rmtree(run)
    erase_run(sd1_folder, run, iterations=2)
    err = refused(args, capsys)
    assert (
        f"{out} holds images of an earlier run in {run.resolve()}, whose step 2 checkpoint was since replaced "
        "(checkpoints/2/"
    ) in err
    assert snapshot(out) == before

    erase_run(sd1_folder, run, iterations=4)  # trained further: the latest checkpoint is step 4
    err = refused(args, capsys)
    assert (
        f"{out} holds images of run {run.resolve()} at step 2, not step 4; use another --out, or empty that one" in err
    )
    # The run's model spelled otherwise is the run's model (refused for the step as before); another
    # model is refused before anything is loaded.
    monkeypatch.chdir(sd1_folder.parent)
    assert "at step 2, not step 4" in refused(["--model", f"./{sd1_folder.name}/", *args], capsys)
    err = refused(["--model", "toy", *args], capsys)
    assert f"--model toy is not the model of run {run} ({sd1_folder}), whose weights belong to that model" in err
    assert snapshot(out) == before


def test_changed_model_files_are_noticed(sd1_folder, tmp_path, capsys):
    """Weights exported over the folder, and the files beside them that change images as much: the
    scheduler's config, the tokenizer, a network's config."""
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(sd1_folder, model)
    args = ["--model", str(model), "--prompt", "red circle", "--steps", "4", "--batch_size", "4", "--out", str(out)]
    assert main(["esd-jax", "sample", *args]) == 0
    before = snapshot(out)
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "unet/config.json",
    ):
        old = (model / name).stat()
        os.utime(model / name, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))  # as a file rewritten
        err = refused(args, capsys)
        assert (
            f"{out} holds images of other files of {model.resolve()}: {name} was {old.st_size} bytes modified " in err
        )
        os.utime(model / name, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert snapshot(out) == before


def record_text(settings=None, images=None) -> str:
    valid = dict.fromkeys(FOLDER_KEYS) | {"model_files": []}
    return json.dumps({"settings": valid if settings is None else settings, "images": images or {}})


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "is damaged (not JSON: "),
        ("[1, 2]", "(not a JSON object with the keys settings and images)"),
        ('{"model": "toy", "steps": 4}', "is damaged or from an older esd-jax"),
        (record_text(settings={"model": "toy"}), "(settings are not an object with the keys model, workdir, esd"),
        (
            record_text(settings=dict.fromkeys(FOLDER_KEYS) | {"model_files": [["unet/x", "big", 0]]}),
            "(model_files is not a list of [path, size, mtime_ns])",
        ),
        (
            record_text(settings=dict.fromkeys(FOLDER_KEYS) | {"model_files": [], "checkpoint_files": 3}),
            "(checkpoint_files is not a list of [path, size, mtime_ns])",
        ),
        (record_text(images={"0_0.png": ["red", 1, 0]}), "(images is not an object of {prompt, seed, index} records)"),
    ],
)
def test_a_damaged_record_is_refused_before_loading_anything(tmp_path, capsys, text, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample.json").write_text(text)
    (out / "0_0.png").write_bytes(b"an image")
    before = snapshot(out)
    err = refused(["--model", "nowhere", "--prompt", "a", "--out", str(out)], capsys)
    assert f"{out / 'sample.json'} is damaged" in err and message in err
    assert err.rstrip().endswith("; delete it, and the images there will be remade")
    assert snapshot(out) == before


def test_a_record_from_before_lora_strengths_reads_as_strength_one(tmp_path):
    from esd_jax.sampling.record import FolderRecord

    settings = dict.fromkeys(FOLDER_KEYS) | {"model_files": []}
    del settings["lora_strength"]
    (tmp_path / "sample.json").write_text(record_text(settings=settings))
    assert FolderRecord(tmp_path).settings["lora_strength"] == 1.0


def test_an_out_that_is_a_file_is_refused_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"not a folder")
    err = refused(["--model", "nowhere", "--prompt", "a", "--out", str(out)], capsys)
    assert f"--out {out}: a file, not a folder for images; pass another --out" in err
    assert out.read_bytes() == b"not a folder"


def test_files_esd_jax_did_not_write_are_never_replaced(sd1_folder, tmp_path, capsys):
    """A picture of the user's under a name a job uses (no record, or a record esd-jax wrote for an image
    since replaced) is refused before any model loads, naming the file; images esd-jax marked are remade."""
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (4, 4), "red").save(pics / "0_0.png")
    nowhere = ["--model", "nowhere", "--prompt", "red", "--out", str(pics)]
    err = refused(nowhere, capsys)
    assert f"{pics / '0_0.png'}: not made by esd-jax sample; move it away or use another --out" in err
    assert not (pics / "sample.json").exists()

    # A --batch_size far above the one image: the batch is one device-count's worth, not a million rows.
    (pics / "0_0.png").rename(tmp_path / "mine.png")
    args = ["--model", str(sd1_folder), "--steps", "2", "--batch_size", "1000000", "--out", str(pics)]
    assert main(["esd-jax", "sample", "--prompt", "red", *args]) == 0
    shutil.copy(tmp_path / "mine.png", pics / "0_0.png")  # over the image on record
    before = snapshot(pics)
    err = refused(["--prompt", "green", *args], capsys)
    assert f"{pics / '0_0.png'}: not made by esd-jax sample" in err
    # With --compare, the base folder's files and compare.png are checked alike (the delta is not read yet).
    (pics / "0_0.png").unlink()
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(b"not read")
    shutil.copy(tmp_path / "mine.png", pics / "compare.png")
    before = snapshot(pics)
    err = refused([*nowhere, "--esd", str(delta), "--compare"], capsys)
    assert f"{pics / 'compare.png'}: not made by esd-jax sample; move it away or use another --out" in err
    assert snapshot(pics) == before


def test_sampler_batches_are_no_larger_than_the_job(sd1_pipe):
    assert Sampler(sd1_pipe, batch_size=10**9, images=3, mesh=mesh(4)).batch_size == 4  # a multiple of 4 devices
    assert Sampler(sd1_pipe, batch_size=10**9, images=3, mesh=mesh(1)).batch_size == 3
    assert Sampler(sd1_pipe, batch_size=2, images=3, mesh=mesh(1)).batch_size == 2


@pytest.mark.parametrize(
    "out,message",
    [
        ("file/sub", "cannot create the folder (Not a directory); pass another --out"),
        ("/proc/esd-jax/out", "cannot create the folder (No such file or directory); pass another --out"),
        ("/proc", "cannot write in it ("),
    ],
)
def test_an_out_that_cannot_be_written_is_refused_before_loading_anything(tmp_path, capsys, out, message):
    (tmp_path / "file").write_bytes(b"a file")
    out = out if out.startswith("/") else str(tmp_path / out)
    err = refused(["--model", "nowhere", "--prompt", "a", "--out", out], capsys)
    assert f"--out {out}: " in err and message in err
    assert (tmp_path / "file").read_bytes() == b"a file"


def test_an_out_inside_the_model_folder_is_refused(tmp_path, capsys):
    """Its images would be files of the model, whose fingerprint would then change with every image."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    for out in (model / "samples", model):
        err = refused(["--model", str(model), "--prompt", "a", "--out", str(out)], capsys)
        assert f"--out {out} is inside the model folder {model.resolve()}" in err
    assert not (model / "samples").exists()


def test_a_delta_with_non_finite_weights_is_refused(sd1_folder, sd1_pipe, tmp_path, capsys):
    key = sorted(trainable_keys(sd1_pipe.unet, "esd-x"))[0]
    value = weights.state_dict(sd1_pipe.unet, {key})[key]
    write_delta({key: np.full_like(value, np.nan)}, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    args = ["--model", str(sd1_folder), "--esd", str(tmp_path / "nan.safetensors"), "--prompt", "red"]
    err = refused([*args, "--steps", "2", "--out", str(out)], capsys)
    assert "non-finite" in err
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "is empty; a prompt CSV has a header row with prompt, evaluation_seed, case_number"),
        ("prompt,case_number\nred,1\n", "has no column 'evaluation_seed'"),
        ("prompt,evaluation_seed,case_number\n", "has a header but no prompts"),
        ("prompt,evaluation_seed,case_number\nred,1,0\ngreen,x1,1\n", "line 3: evaluation_seed 'x1' is not an integer"),
        ("prompt,evaluation_seed,case_number\nred,-1,0\n", "line 2: evaluation_seed -1 is outside 0..4294967295"),
        ("prompt,evaluation_seed,case_number\nred,1,0\ngreen,2,0\n", "line 3: case_number 0 repeats line 2"),
        ("prompt,evaluation_seed,case_number\nred,1,1e300\n", "line 2: case_number 1e300 is outside -9999"),
        ("prompt,evaluation_seed,case_number\nred,1,-1000000000000000\n", "line 2: case_number -1000000000000000"),
        ("prompt,evaluation_seed,case_number,prompt\nred,1,0,x\n", "the header names the column 'prompt' twice"),
        (
            'prompt,evaluation_seed,case_number\nred,1,0\n"green,2,1\nblue,3,2\n',
            'line 3: a quote (") opens a field that never closes',
        ),
        ('prompt,evaluation_seed,case_number\n"red" circle,1,0\n', "line 2: not a readable CSV"),
        (
            "prompt,evaluation_seed,case_number\nred,1,0\nred, green,1,1\n",
            "line 3: 4 fields, and the header names 3; quote a prompt that holds commas",
        ),
    ],
)
def test_bad_csvs_give_one_line_errors(tmp_path, capsys, text, message):
    csv = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        read_prompts_csv(csv)
    assert str(csv) in str(e.value) and "\n" not in str(e.value)
    # The CLI fails on the CSV before loading any model.
    rc = main(["esd-jax", "sample", "--model", "nowhere", "--prompts", str(csv), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_csv_reading_ignores_other_columns(tmp_path):
    csv = write_csv(tmp_path / "p.csv", '\ufeffa,prompt,evaluation_seed,case_number\nx,"red, green",4.0,12\n')
    [row] = read_prompts_csv(csv)
    assert (row.prompt, row.seed, row.case_number) == ("red, green", 4, 12)


def perturbed_delta(unet, path) -> dict[str, np.ndarray]:
    """A delta file like the official code writes: the cross-attention weights, trained (here: perturbed)."""
    rng = np.random.default_rng(3)
    keys = trainable_keys(unet, "esd-x")
    delta = {
        k: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.state_dict(unet, keys).items()
    }
    write_delta(delta, path)
    return delta


def test_esd_delta_and_compare_grid_from_the_cli(sd1_folder, sd1_pipe, tmp_path, capsys):
    delta = perturbed_delta(sd1_pipe.unet, tmp_path / "esd-x.safetensors")
    # The reference: diffusers' own loading of a delta, `unet.load_state_dict(delta, strict=False)`.
    ref = build_torch_pipeline("sd1")
    missing, unexpected = ref.unet.load_state_dict({k: torch.from_numpy(v) for k, v in delta.items()}, strict=False)
    assert not unexpected and len(missing) > len(delta)
    ref.save_pretrained(tmp_path / "erased-model")

    out = tmp_path / "out"
    common = ["--prompt", "red circle", "--seed", "5", "--num_per_prompt", "2", "--steps", "4", "--batch_size", "4"]
    rc = main(["esd-jax", "sample", "--model", str(sd1_folder), "--esd", str(tmp_path / "esd-x.safetensors")]
              + common + ["--out", str(out), "--compare"])  # fmt: skip
    assert rc == 0

    settings = dict(seeds=5, num_per_prompt=2, steps=4, batch_size=4)
    base = esd_jax.sample(sd1_pipe, "red circle", **settings)
    erased = esd_jax.sample(esd_jax.load_pipeline(tmp_path / "erased-model"), "red circle", **settings)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "base" / f"0_{i}.png")), base[i])
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"0_{i}.png")), erased[i])
    assert not np.array_equal(base, erased)
    grid = Image.open(out / "compare.png")
    assert grid.width >= 4 * 16 and grid.height >= 16 + 16  # a label row, then the prompt's row of images

    # The base images are on record as the base model's, the erased ones as the delta's.
    base_settings, erased_settings = (
        json.loads((f / "sample.json").read_text())["settings"] for f in (out / "base", out)
    )
    delta_path = tmp_path / "esd-x.safetensors"
    assert (base_settings["esd"], base_settings["esd_sha256"], base_settings["workdir"]) == (None, None, None)
    assert erased_settings["esd"] == str(delta_path.resolve())
    assert erased_settings["esd_sha256"] == hashlib.sha256(delta_path.read_bytes()).hexdigest()
    assert base_settings == {**erased_settings, "esd": None, "esd_sha256": None}
    # Another delta under the same name: refused before anything is sampled or written.
    before = snapshot(out)
    write_delta({k: 2 * v for k, v in delta.items()}, delta_path)
    err = refused(
        ["--model", str(sd1_folder), "--esd", str(delta_path), *common, "--out", str(out), "--compare"], capsys
    )
    assert (
        f"{out} holds images of {delta_path.resolve()} as it was (sha256 {erased_settings['esd_sha256'][:12]})" in err
    )
    assert snapshot(out) == before


def test_delta_files_in_bfloat16_load_and_unknown_keys_are_named(sd1_folder, tmp_path):
    import safetensors.torch

    pipe = esd_jax.load_pipeline(sd1_folder)
    key = sorted(trainable_keys(pipe.unet, "esd-x-strict"))[0]
    value = torch.from_numpy(weights.state_dict(pipe.unet, {key})[key]) + 1.0
    safetensors.torch.save_file({key: value.to(torch.bfloat16)}, tmp_path / "bf16.safetensors")
    apply_delta(pipe, tmp_path / "bf16.safetensors")
    np.testing.assert_array_equal(weights.state_dict(pipe.unet, {key})[key], value.to(torch.bfloat16).float().numpy())

    safetensors.torch.save_file({"down_blocks.9.nothing.weight": value}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="'down_blocks.9.nothing.weight' is not a UNet weight of this model"):
        apply_delta(pipe, tmp_path / "other.safetensors")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "a", "--model", "no/such/folder"], "no such folder, and not a hub id"),
        (["--model", "m"], "give either --prompt TEXT or --prompts FILE.csv"),
        (["--model", "m", "--prompt", "a", "--compare"], "--compare needs the erased model"),
        (["--model", "m", "--prompt", "a", "--esd", "x.safetensors"], "--esd x.safetensors: no such file"),
        (["--model", "m", "--prompt", "a", "--scheduler", "heun"], "bad flag"),
    ],
)
def test_cli_argument_errors(tmp_path, capsys, args, message):
    assert main(["esd-jax", "sample", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
