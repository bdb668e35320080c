"""load_pipeline / save_pretrained against PyTorch diffusers on tiny random pipelines saved by diffusers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import esd_jax
from esd_jax import weights
from esd_jax.cli import main
from esd_jax.errors import UserError

COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_loaded_pipeline_matches_diffusers(tiny_pipeline):
    folder, ref = tiny_pipeline
    pipe = esd_jax.load_pipeline(folder)
    rng = np.random.default_rng(0)

    ids = ref.tokenizer(
        ["a red circle", "van gogh painting"], padding="max_length", max_length=16, return_tensors="np"
    ).input_ids
    with torch.no_grad():
        want_text = ref.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_err(pipe.text_encoder(jnp.asarray(ids)), want_text) <= 1e-4

    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 900])
    with torch.no_grad():
        want = ref.unet(torch.tensor(latents), torch.tensor(t), torch.tensor(want_text)).sample.numpy()
    assert rel_err(pipe.unet(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(want_text)), want) <= 1e-4

    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = ref.vae.encode(torch.tensor(images)).latent_dist
        decoded = ref.vae.decode(torch.tensor(latents)).sample.numpy()
    mean, logvar = pipe.vae.encode(jnp.asarray(images))
    assert rel_err(mean, dist.mean.numpy()) <= 1e-4
    assert rel_err(logvar, dist.logvar.numpy()) <= 1e-4
    assert rel_err(pipe.vae.decode(jnp.asarray(latents)), decoded) <= 1e-4
    assert pipe.vae.scaling_factor == ref.vae.config.scaling_factor
    assert pipe.scheduler_config["_class_name"] == "DDIMScheduler"
    assert pipe.tokenizer("a red circle").input_ids == ref.tokenizer("a red circle").input_ids


def test_save_pretrained_round_trip_is_bit_exact_and_loads_in_diffusers(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, ref = tiny_pipeline
    out = tmp_path / "saved"
    esd_jax.load_pipeline(folder).save_pretrained(out)
    for name, file in COMPONENT_FILES.items():
        original, saved = load_file(folder / file), load_file(out / file)
        if name == "text_encoder":  # transformers 5 writes unprefixed keys; we write the prefixed form
            assert all(k.startswith("text_model.") for k in saved)
            saved = {k.removeprefix("text_model."): v for k, v in saved.items()}
        assert saved.keys() == original.keys()
        for key in original:
            assert saved[key].dtype == original[key].dtype and np.array_equal(saved[key], original[key]), key

    reloaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    for name in COMPONENT_FILES:
        want, got = getattr(ref, name).state_dict(), getattr(reloaded, name).state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"
    assert reloaded.scheduler.config["beta_schedule"] == ref.scheduler.config["beta_schedule"]


def test_prefixed_text_encoder_checkpoint_loads(tiny_pipeline, tmp_path):
    """Real SD checkpoints (transformers 4) carry `text_model.` keys and a position_ids buffer."""
    folder, ref = tiny_pipeline
    copy = tmp_path / "prefixed"
    shutil.copytree(folder, copy)
    tensors = load_file(folder / COMPONENT_FILES["text_encoder"])
    tensors = {f"text_model.{k}": v for k, v in tensors.items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(tensors, copy / COMPONENT_FILES["text_encoder"])
    ids = np.array([[1, 2, 3, 4]])
    with torch.no_grad():
        want = ref.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_err(esd_jax.load_pipeline(copy).text_encoder(jnp.asarray(ids)), want) <= 1e-4


def test_failed_save_keeps_the_previous_folder(tiny_pipeline, tmp_path, monkeypatch):
    folder, _ = tiny_pipeline
    pipe = esd_jax.load_pipeline(folder)
    out = tmp_path / "out"
    pipe.save_pretrained(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def hub_cache(folder: Path, cache: Path, repo: str) -> None:
    """Lays `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo`."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(folder, entry / "snapshots" / commit)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "esd_jax.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_hub_id_loads_from_cache_offline_and_fails_clearly_when_absent(tiny_pipeline, tmp_path):
    folder, _ = tiny_pipeline
    hub_cache(folder, tmp_path, "esd-test/tiny")
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    ok = run_cli("info", "--model", "esd-test/tiny", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "unet:" in ok.stdout and "parameters" in ok.stdout

    missing = run_cli("info", "--model", "esd-test/absent", env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert "not in the Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr


def broken_copy(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def to_bin(copy: Path) -> None:
    path = copy / COMPONENT_FILES["unet"]
    path.rename(path.with_suffix(".bin"))


def bad_shape(copy: Path) -> None:
    tensors = load_file(copy / COMPONENT_FILES["unet"])
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:16]
    save_file(tensors, copy / COMPONENT_FILES["unet"])


def sdxl(copy: Path) -> None:
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))


def sdxl_unet(copy: Path) -> None:
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (copy / "unet" / "config.json").write_text(json.dumps(config))


UNET, VAE, TEXT = "unet/config.json", "vae/config.json", "text_encoder/config.json"
SCHEDULER = "scheduler/scheduler_config.json"
MISSING = object()  # set_key's value that removes the key


def write(file: str, content: str | bytes):
    """An edit replacing `file` of the folder with `content`."""

    def edit(copy: Path) -> None:
        (copy / file).write_bytes(content if isinstance(content, bytes) else content.encode())

    return edit


def set_key(file: str, key: str, value):
    """An edit setting `key` of the JSON object in `file` (a missing value: removing it)."""

    def edit(copy: Path) -> None:
        config = json.loads((copy / file).read_text())
        if value is MISSING:
            del config[key]
        else:
            config[key] = value
        (copy / file).write_text(json.dumps(config))

    return edit


def truncate(file: str):
    def edit(copy: Path) -> None:
        data = (copy / file).read_bytes()
        (copy / file).write_bytes(data[: len(data) // 2])

    return edit


def empty_tokenizer(copy: Path) -> None:
    for f in (copy / "tokenizer").iterdir():
        f.unlink()


BAD_FOLDERS = [
    (to_bin, "only PyTorch pickle weights"),
    (bad_shape, "'conv_in.weight' has shape (16, 4, 3, 3), the config implies (32, 4, 3, 3)"),
    (
        sdxl,
        "text_encoder_2 is missing; a StableDiffusionXLPipeline folder has unet/, vae/, text_encoder/, text_encoder_2/",
    ),
    (sdxl_unet, 'names a StableDiffusionPipeline but unet/config.json has addition_embed_type="text_time"'),
    (lambda c: (c / "model_index.json").unlink(), "model_index.json is missing"),
    # JSON that is not an object of keys
    (write("model_index.json", "[1, 2]"), "model_index.json: holds an array, not an object"),
    (write("model_index.json", '"x"'), "model_index.json: holds a string, not an object"),
    (write(UNET, "[1]"), "unet/config.json: holds an array, not an object"),
    (write(VAE, "null"), "vae/config.json: holds null, not an object"),
    (write(TEXT, "{"), "text_encoder/config.json: not valid JSON"),
    (write(SCHEDULER, "3"), "scheduler_config.json: holds a number, not an object"),
    # network config values of the wrong type or sign, and keys esd-jax reads straight from the file
    (set_key(UNET, "block_out_channels", "abc"), 'block_out_channels="abc" is not valid; expected list of positive'),
    (set_key(UNET, "block_out_channels", [32, -64]), "block_out_channels=[32, -64] is not valid"),
    (set_key(UNET, "sample_size", -3), "unet/config.json: sample_size=-3 is not supported; expected positive int"),
    (set_key(UNET, "sample_size", [8, 8]), "sample_size=[8, 8] is not supported"),
    (set_key(UNET, "sample_size", MISSING), "unet/config.json: the key 'sample_size' is missing"),
    (set_key(UNET, "down_block_types", MISSING), "unet/config.json: the key 'down_block_types' is missing"),
    (set_key(UNET, "in_channels", 0), "unet/config.json: in_channels=0 is not valid; expected positive int"),
    (set_key(UNET, "attention_head_dim", "4"), 'attention_head_dim="4" is not valid; expected positive int or list'),
    (set_key(UNET, "flip_sin_to_cos", "yes"), 'flip_sin_to_cos="yes" is not valid; expected true or false'),
    (set_key(UNET, "norm_num_groups", 5), "unet/config.json: unet config: norm_num_groups=5 is not supported"),
    (set_key(VAE, "block_out_channels", MISSING), "vae/config.json: the key 'block_out_channels' is missing"),
    (set_key(VAE, "latent_channels", 0), "vae/config.json: latent_channels=0 is not valid"),
    (set_key(VAE, "scaling_factor", -1), "vae/config.json: scaling_factor=-1 is not valid; expected positive number"),
    (set_key(TEXT, "hidden_size", "abc"), 'text_encoder/config.json: hidden_size="abc" is not valid'),
    (set_key(TEXT, "num_attention_heads", 0), "text_encoder/config.json: num_attention_heads=0 is not valid"),
    (set_key(TEXT, "vocab_size", 542.5), "vocab_size=542.5 is not valid; expected positive int"),
    # scheduler values diffusers would take and then fail or index out of range with
    (set_key(SCHEDULER, "num_train_timesteps", 0), "num_train_timesteps=0 is not supported; supported: an int >= 1"),
    (set_key(SCHEDULER, "num_train_timesteps", "abc"), "num_train_timesteps='abc' is not supported"),
    (set_key(SCHEDULER, "beta_start", 0.5), "beta_end=0.012 is not supported; supported: a number in [beta_start=0.5"),
    (set_key(SCHEDULER, "beta_start", -0.1), "beta_start=-0.1 is not supported; supported: a number in (0, 1)"),
    (set_key(SCHEDULER, "beta_schedule", "cosine"), "beta_schedule='cosine' is not supported"),
    (set_key(SCHEDULER, "prediction_type", "x0"), "prediction_type='x0' is not supported"),
    (set_key(SCHEDULER, "steps_offset", -1), "steps_offset=-1 is not supported; supported: an int in 0..999"),
    (set_key(SCHEDULER, "timestep_spacing", "karras"), "timestep_spacing='karras' is not supported"),
    # weights and tokenizer files that are not what they claim
    (write(COMPONENT_FILES["unet"], b"garbage" * 10), "unet/diffusion_pytorch_model.safetensors: not a readable"),
    (write(COMPONENT_FILES["vae"], b""), "vae/diffusion_pytorch_model.safetensors: not a readable safetensors file"),
    (truncate(COMPONENT_FILES["text_encoder"]), "text_encoder/model.safetensors: not a readable safetensors file"),
    (empty_tokenizer, "tokenizer: no tokenizer.json or vocab.json"),
    (write("tokenizer/tokenizer.json", "garbage"), "tokenizer: not a readable CLIP tokenizer"),
]


@pytest.mark.parametrize("edit, message", BAD_FOLDERS)
def test_bad_checkpoints_raise_one_clear_line(sd1_folder, tmp_path, capsys, edit, message):
    folder = broken_copy(sd1_folder, tmp_path, edit)
    with pytest.raises(UserError) as err:
        esd_jax.load_pipeline(folder)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["esd-jax", "info", "--model", str(folder)]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and message in out.err and out.err.count("\n") == 1 and not out.out


def test_a_config_the_checks_miss_still_names_its_file(sd1_folder, monkeypatch):
    """Past the checks, a failure while building a network from its config is the file's fault, and says so."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(esd_jax.pipeline.vae.AutoencoderKL, "__init__", broken)
    with pytest.raises(UserError, match=r"vae/config\.json: cannot build the vae from this config \(ZeroDivisionError"):
        esd_jax.load_pipeline(sd1_folder)


def test_bad_model_names_and_dtypes():
    with pytest.raises(UserError, match="no such folder, and not a hub id"):
        esd_jax.load_pipeline("/no/such/folder")
    with pytest.raises(UserError, match="dtype 'float8' is not supported"):
        esd_jax.load_pipeline("/no/such/folder", dtype="float8")


def test_cli_reports_bad_input_without_traceback(tmp_path):
    result = run_cli("info", "--model", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: model ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_new_pipeline_saves_a_folder_diffusers_loads(tmp_path):
    """A pipeline built from scratch (scripts/make_tiny_pipeline.py) computes what diffusers computes from it."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    subprocess.run(
        [sys.executable, "scripts/make_tiny_pipeline.py", str(out)],
        check=True,
        capture_output=True,
        cwd=Path(__file__).parents[1],
    )
    ours = esd_jax.load_pipeline(out)
    ref = StableDiffusionPipeline.from_pretrained(out)
    ids = ref.tokenizer(["a photo of a dog"], padding="max_length", max_length=16, return_tensors="np").input_ids
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        text = ref.text_encoder(torch.tensor(ids)).last_hidden_state
        want = ref.unet(torch.tensor(latents), 500, text).sample.numpy()
        image = ref.vae.decode(torch.tensor(latents)).sample.numpy()
    assert rel_err(ours.text_encoder(jnp.asarray(ids)), text.numpy()) <= 1e-4
    assert rel_err(ours.unet(jnp.asarray(latents), 500, jnp.asarray(text.numpy())), want) <= 1e-4
    assert rel_err(ours.vae.decode(jnp.asarray(latents)), image) <= 1e-4
