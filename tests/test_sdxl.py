"""SDXL against diffusers' StableDiffusionXLPipeline on the tiny random one of conftest: loading, prompt
encoding, the networks, sampling, the ESD target, saving and the single file."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLPipeline

import esd_jax
from esd_jax import single_file, weights
from esd_jax.conditioning import concat, repeat, take
from esd_jax.esd import Objective, esd_target
from esd_jax.sampling.sampler import sample_with_latents

PROMPTS = ["a red circle", "van gogh painting of a green circle"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def sdxl(sdxl_pipeline):
    folder, ref = sdxl_pipeline
    return folder, ref, esd_jax.load_pipeline(folder)


def reference_prompts(ref, prompts: list[str]) -> dict[str, torch.Tensor]:
    """diffusers' encode_prompt with guidance and no negative prompt: the zeroed unconditional prompt."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(prompts, device="cpu")
    return dict(embeds=embeds, negative=negative, pooled=pooled, negative_pooled=negative_pooled)


def test_prompts_encode_as_diffusers_encode_prompt(sdxl):
    _, ref, pipe = sdxl
    want = reference_prompts(ref, PROMPTS)
    cond = pipe.encode(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 16, 80)  # both encoders' penultimate states, joined
    assert rel_err(cond["encoder_hidden_states"], want["embeds"].numpy()) <= 1e-5
    assert rel_err(cond["text_embeds"], want["pooled"].numpy()) <= 1e-5
    np.testing.assert_array_equal(cond["time_ids"], [[16, 16, 0, 0, 16, 16]] * 2)  # native 16 px, no crop
    null = pipe.null(pipe.encode([""]))
    assert pipe.zero_null and not np.any(null["encoder_hidden_states"]) and not np.any(null["text_embeds"])
    assert want["negative"].abs().max() == 0 and want["negative_pooled"].abs().max() == 0
    np.testing.assert_array_equal(pipe.encode([""], resolution=32)["time_ids"], [[32, 32, 0, 0, 32, 32]])


def test_networks_match_diffusers(sdxl):
    """The UNet with the added conditioning at several timesteps, both text encoders' hidden states and
    pooled output, and the VAE with SDXL's scaling factor."""
    folder, ref, pipe = sdxl
    ids = [pipe.token_ids(PROMPTS, t) for t in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        one = ref.text_encoder(torch.tensor(ids[0]), output_hidden_states=True)
        two = ref.text_encoder_2(torch.tensor(ids[1]), output_hidden_states=True)
    assert rel_err(pipe.text_encoder(jnp.asarray(ids[0])), one.last_hidden_state.numpy()) <= 1e-5
    assert rel_err(pipe.text_encoder.penultimate(jnp.asarray(ids[0])), one.hidden_states[-2].numpy()) <= 1e-5
    hidden, pooled = pipe.text_encoder_2.penultimate_and_text_embeds(jnp.asarray(ids[1]))
    assert rel_err(hidden, two.hidden_states[-2].numpy()) <= 1e-5
    assert rel_err(pooled, two.text_embeds.numpy()) <= 1e-5

    rng = np.random.default_rng(0)
    cond = pipe.encode(PROMPTS)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    added = {k: torch.tensor(np.asarray(cond[k])) for k in ("text_embeds", "time_ids")}
    for t in ([0, 500], [999, 999], [321, 17]):
        with torch.no_grad():
            want = ref.unet(
                torch.tensor(latents),
                torch.tensor(t),
                torch.tensor(np.asarray(cond["encoder_hidden_states"])),
                added_cond_kwargs=added,
            ).sample.numpy()
        assert rel_err(pipe.unet(jnp.asarray(latents), jnp.asarray(t), **cond), want) <= 1e-4, t

    with torch.no_grad():
        decoded = ref.vae.decode(torch.tensor(latents)).sample.numpy()
    assert rel_err(pipe.vae.decode(jnp.asarray(latents)), decoded) <= 1e-4
    assert pipe.vae.scaling_factor == ref.vae.config.scaling_factor == 0.13025
    # SDXL's VAE overflows in float16: its pipeline decodes in float32 (force_upcast), as diffusers' does.
    half = esd_jax.pipeline.abstract_pipeline(folder, "float16")
    assert half.vae.decoder.conv_in.dtype == jnp.float32 and half.unet.conv_in.dtype == jnp.float16


@pytest.mark.parametrize(
    "scheduler", ["euler", pytest.param("ddim", marks=pytest.mark.slow), pytest.param("dpm++", marks=pytest.mark.slow)]
)
def test_sampled_latents_match_the_diffusers_pipeline(sdxl, scheduler):
    """Guided sampling from the same noise: the final latents of diffusers' SDXL pipeline (Euler, its own
    scheduler; DDIM and DPM-Solver++ built from its config), 3 steps."""
    _, ref, pipe = sdxl
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    schedulers = {"euler": type(ref.scheduler), "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
    scheduler_ref = schedulers[scheduler].from_config(ref.scheduler.config)
    reference = type(ref)(**{**ref.components, "scheduler": scheduler_ref})
    with torch.no_grad():
        want = reference(
            PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=torch.tensor(noise), output_type="latent"
        ).images.numpy()
    _, got = sample_with_latents(pipe, PROMPTS, latents=noise, steps=3, guidance=5.0, scheduler=scheduler)
    assert rel_err(got, want) <= 1e-4


def test_esd_target_matches_a_pytorch_computation(sdxl):
    """e_0 - eta (e_c - e_0) with the zeroed unconditional prompt and the added conditioning."""
    _, ref, pipe = sdxl
    want_prompts = reference_prompts(ref, PROMPTS[:1])
    x_t = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([981, 401])
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)

    def unet(embeds, pooled):
        added = {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids}
        return ref.unet(torch.tensor(x_t), torch.tensor(t), embeds.repeat(2, 1, 1), added_cond_kwargs=added).sample

    with torch.no_grad():
        e_0 = unet(want_prompts["negative"], want_prompts["negative_pooled"])
        e_c = unet(want_prompts["embeds"], want_prompts["pooled"])
    want = (e_0 - 2.0 * (e_c - e_0)).numpy()

    objective = Objective(2.0, 3.0, 5, "frozen", (4, 8, 8), False)
    c = take(pipe.encode(PROMPTS[:1]), jnp.array([0, 0]))
    null = jax.tree.map(lambda x: x[0], pipe.null(pipe.encode([""])))
    got = esd_target(pipe.unet, objective, jnp.asarray(x_t), jnp.asarray(t), c, c, null)
    assert rel_err(got, want) <= 1e-4
    assert concat([repeat(null, c), c])["time_ids"].shape == (4, 6)


def test_save_pretrained_round_trip_is_exact_and_loads_in_diffusers(sdxl, tmp_path):
    _, ref, pipe = sdxl
    pipe.save_pretrained(tmp_path / "out")
    again = esd_jax.load_pipeline(tmp_path / "out")
    for name in pipe.networks:
        a, b = weights.state_dict(getattr(pipe, name)), weights.state_dict(getattr(again, name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    for name in pipe.networks:  # a missing key would be initialised afresh, an unexpected one dropped: unequal
        want = getattr(ref, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert loaded.tokenizer_2("a red circle").input_ids == ref.tokenizer_2("a red circle").input_ids


def test_single_file_reads_back_in_diffusers(sdxl, tmp_path):
    folder, ref, pipe = sdxl
    path = tmp_path / "sdxl.safetensors"
    single_file.write_single_file(pipe, path)
    # The folder's configs tell diffusers what each network is: the tiny encoders are too small for its
    # detection by key names (infer_diffusers_model_type).
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in pipe.networks:
        want, got = getattr(ref, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.slow
def test_cli_erases_exports_and_samples(sdxl, tmp_path):
    """`esd-jax erase` on SDXL (fast mode, retain prompts), then export as a diffusers folder and a single
    file that diffusers loads with the delta's weights in place, and `esd-jax sample` of the run with Euler
    whose images equal sampling the exported folder."""
    from PIL import Image
    from safetensors.numpy import load_file

    from esd_jax.cli import main
    from esd_jax.partition import trainable_keys

    folder, ref, pipe = sdxl
    run = tmp_path / "run"
    erase = [
        "erase",
        "--config",
        str(Path(__file__).parents[1] / "configs" / "esd_x.py"),
        f"--config.model={folder}",
        "--config.concept=red circle",
        "--config.retain=green circle",
        "--config.iterations=2",
        "--config.ddim_steps=3",
        "--config.trajectories=4",
        "--config.learning_rate=1e-3",
        f"--config.workdir={run}",
    ]
    assert main(["esd-jax", *erase]) == 0
    delta = load_file(next(run.glob("esd-*.safetensors")))
    assert set(delta) == trainable_keys(pipe.unet, "esd-x")
    assert any("add_embedding" in k for k in trainable_keys(pipe.unet, "esd-u"))

    assert main(["esd-jax", "export", "--workdir", str(run), "--out", str(tmp_path / "folder")]) == 0
    exported = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    unet = exported.unet.state_dict()
    assert all(np.array_equal(unet[k].numpy(), v) for k, v in delta.items())
    out = tmp_path / "erased.safetensors"
    assert main(["esd-jax", "export", "--workdir", str(run), "--out", str(out), "--format", "single-file"]) == 0
    single = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in unet.items())

    images = tmp_path / "images"
    common = ["--prompt", "red circle", "--steps", "3", "--batch_size", "4", "--scheduler", "euler"]
    assert main(["esd-jax", "sample", "--workdir", str(run), *common, "--out", str(images)]) == 0
    want = esd_jax.sample(esd_jax.load_pipeline(tmp_path / "folder"), "red circle", steps=3, scheduler="euler")
    np.testing.assert_array_equal(np.asarray(Image.open(images / "0_0.png")), want[0])
