"""Sampling against diffusers' StableDiffusionPipeline on the same weights; devices, batches, CSVs, the CLI."""

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
from esd_jax.errors import UserError
from esd_jax.export import write_delta
from esd_jax.partition import trainable_keys
from esd_jax.run import apply_delta
from esd_jax.sampling import generate, initial_noise, read_prompts_csv, sample_to_folder

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

    images, latents = generate(
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
        np.testing.assert_array_equal(np.asarray(got[row]), np.asarray(want))


def test_images_do_not_depend_on_devices_or_batch_size(sd1_pipe):
    """One device with batches of 3 against four devices with one image each (plus padding)."""
    args = dict(prompts=["red circle", "green", "van gogh"], seeds=[1, 2, 3], num_per_prompt=2, steps=4)
    one = generate(sd1_pipe, **args, mesh=mesh(1), batch_size=3)
    four = generate(sd1_pipe, **args, mesh=mesh(4), batch_size=1)
    # Other batch shapes may run other kernels: the same up to float rounding, the same pixels.
    np.testing.assert_allclose(four[1], one[1], rtol=0, atol=1e-5 * np.abs(one[1]).max())
    np.testing.assert_array_equal(esd_jax.sampling.to_uint8(four[0]), esd_jax.sampling.to_uint8(one[0]))
    # Each image differs from the others: the seeds and the per-prompt index both reach the noise.
    assert len({im.tobytes() for im in esd_jax.sampling.to_uint8(one[0])}) == 6


def write_csv(path, text: str):
    path.write_text(text)
    return path


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


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "is empty; a prompt CSV has a header row with prompt, evaluation_seed, case_number"),
        ("prompt,case_number\nred,1\n", "has no column 'evaluation_seed'"),
        ("prompt,evaluation_seed,case_number\n", "has a header but no prompts"),
        ("prompt,evaluation_seed,case_number\nred,1,0\ngreen,x1,1\n", "line 3: evaluation_seed 'x1' is not an integer"),
        ("prompt,evaluation_seed,case_number\nred,-1,0\n", "line 2: evaluation_seed -1 is outside 0..4294967295"),
        ("prompt,evaluation_seed,case_number\nred,1,0\ngreen,2,0\n", "line 3: case_number 0 repeats line 2"),
    ],
)
def test_bad_csvs_give_one_line_errors(tmp_path, capsys, text, message):
    csv = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(UserError, match=message) as e:
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


def test_esd_delta_and_compare_grid_from_the_cli(sd1_folder, sd1_pipe, tmp_path):
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
        (["--model", "m", "--prompt", "a", "--scheduler", "euler"], "bad flag"),
    ],
)
def test_cli_argument_errors(tmp_path, capsys, args, message):
    assert main(["esd-jax", "sample", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
