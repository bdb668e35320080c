"""Erasure as a LoRA: the adapters, the run, and the files read back by diffusers' own loaders.

The references are PyTorch's: diffusers' UNet2DConditionModel, its named_modules() for the kohya names, and
diffusers' LoRA readers (`lora_state_dict`, which converts kohya files, and `load_lora_weights` where PEFT is
installed) merged into that UNet. Tolerances: 1e-4 relative for a UNet's output across frameworks, as
tests/test_unet.py; 1e-6 for float32 arithmetic on one weight.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import esd_jax
from esd_jax import weights
from esd_jax.config import EraseConfig, SampleConfig, default_config
from esd_jax.errors import UserError
from esd_jax.esd import trained_unet
from esd_jax.export import export_run
from esd_jax.partition import split_for_erase
from esd_jax.run import apply_delta, apply_run, check_erasure, restore_run
from esd_jax.train import erase

RANK, ALPHA = 2, 1.0


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def erase_run(folder, workdir, **values):
    cfg = default_config()
    cfg.update(
        dict(model=str(folder), concept="red", iterations=2, ddim_steps=2, checkpoint_every=1, workdir=str(workdir))
    )
    cfg.update(values)
    return erase(EraseConfig.from_config_dict(cfg))


@pytest.fixture(scope="module")
def lora_run(sd1_folder, tmp_path_factory):
    """A two-step LoRA run of every layer (esd-all: Linear, 1x1 and 3x3 convs, strided ones) on the SD1 shape,
    at a learning rate that moves the adapters far enough to be seen."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    path = erase_run(sd1_folder, workdir, method="esd-all", lora_rank=RANK, lora_alpha=ALPHA, learning_rate=1e-2)
    return workdir, path


@pytest.fixture(scope="module")
def full_run(sd1_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full") / "run"
    return workdir, erase_run(sd1_folder, workdir, learning_rate=1e-3)


def test_adapters_start_at_the_base_model(sd1_folder):
    unet = esd_jax.load_pipeline(sd1_folder).unet
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    t = jnp.array([10, 700])
    graphdef, adapters, original, frozen = split_for_erase(unet, "esd-all", RANK, ALPHA, seed=3)
    want = jax.jit(lambda o, f: nnx.merge(graphdef, o, f)(x, t, context))(original, frozen)
    got = jax.jit(lambda a, o, f: trained_unet(graphdef, a, o, f)(x, t, context))(adapters, original, frozen)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    for down in jax.tree.leaves(adapters.down):  # kohya's kaiming_uniform_(a=sqrt(5)): within 1/sqrt(fan_in)
        bound = 1 / math.sqrt(math.prod(down.shape[:-1]))
        assert down.shape[-1] == RANK and 0.5 * bound < float(jnp.abs(down).max()) <= bound
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(adapters.up))
    assert adapters.scale == ALPHA / RANK


def test_a_lora_run_holds_no_copy_of_the_originals(sd1_folder):
    """The adapted weights are split off the UNet as they are: each array is the UNet's own, the frozen part
    holds everything else once, and the trained state is r x (in x k x k + out) numbers per layer."""
    unet = esd_jax.load_pipeline(sd1_folder).unet
    params = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
    _, adapters, original, frozen = split_for_erase(unet, "esd-x", RANK, ALPHA, seed=0)
    held = dict(nnx.to_flat_state(original)) | dict(nnx.to_flat_state(frozen))
    assert held.keys() == params.keys() and len(nnx.to_flat_state(original)) + len(nnx.to_flat_state(frozen)) == len(
        params
    )
    assert all(held[p][...] is params[p][...] for p in params)
    adapted = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(original)]
    assert adapted and all("attn2" in k and k.endswith(".weight") for k in adapted)
    expected = sum(RANK * (w.shape[0] + w.shape[1]) for _, w in nnx.to_flat_state(original))
    assert sum(x.size for x in jax.tree.leaves(adapters)) == expected


@pytest.mark.slow
def test_sharded_weights_train_the_same_adapters(sd1_folder, lora_run, tmp_path):
    """FSDP: the adapted weights enter the step sharded over the 4 devices and are gathered where the
    adapters are merged into them; the adapters are replicated. What the step computes is the same."""
    _, path = lora_run
    settings = dict(method="esd-all", lora_rank=RANK, lora_alpha=ALPHA, learning_rate=1e-2, shard_params=True)
    sharded, want = load_file(erase_run(sd1_folder, tmp_path, **settings)), load_file(path)
    assert sharded.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(sharded[key], want[key], rtol=1e-5, atol=1e-6)


def test_kohya_names_follow_the_torch_modules_of_every_layer_type(lora_run, sd1_folder):
    """Every Linear and Conv2d of diffusers' UNet that esd-all selects has lora_unet_<name, "." -> "_"> with
    kohya's shapes: down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1], a 0-d alpha."""
    from diffusers import UNet2DConditionModel

    _, path = lora_run
    tensors = load_file(path)
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {type(m) for m in modules.values()} == {torch.nn.Linear, torch.nn.Conv2d}
    kinds = {tuple(m.kernel_size) for m in modules.values() if isinstance(m, torch.nn.Conv2d)}
    assert kinds == {(1, 1), (3, 3)}
    expected = set()
    for name, m in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        expected |= {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
        if isinstance(m, torch.nn.Linear):
            down, up = (RANK, m.in_features), (m.out_features, RANK)
        else:
            down, up = (RANK, m.in_channels, *m.kernel_size), (m.out_channels, RANK, 1, 1)
        assert tensors[f"{key}.lora_down.weight"].shape == down, name
        assert tensors[f"{key}.lora_up.weight"].shape == up, name
        assert tensors[f"{key}.alpha"].shape == () and float(tensors[f"{key}.alpha"]) == ALPHA
    assert set(tensors) == expected


def merged_torch_unet(pipe, peft_state: dict, scales: dict):
    """diffusers' UNet with W + scale x lora_B @ lora_A for every module a PEFT-named state dict adapts."""
    unet = pipe.unet
    unet_copy = type(unet).from_config(unet.config)
    unet_copy.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for key, a in peft_state.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("unet.").split(".lora_A.")[0]
            b = peft_state[key.replace(".lora_A.", ".lora_B.")]
            w = unet_copy.get_submodule(module).weight
            w += scales[module] * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    return unet_copy


def unet_outputs(jax_unet, torch_unet):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 5, 32)).astype(np.float32)
    t = np.array([50, 800])
    got = np.asarray(jax_unet(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
    with torch.no_grad():
        want = torch_unet(torch.tensor(x), torch.tensor(t), torch.tensor(context)).sample.numpy()
    return got, want


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    workdir, _ = lora_run
    out = tmp_path_factory.mktemp("exported")
    return {fmt: export_run(workdir, out / f"{fmt}.safetensors", fmt=fmt) for fmt in ("lora-kohya", "lora-diffusers")}


def test_diffusers_reads_both_files_as_the_merged_model(lora_run, exported, sd1_folder):
    """diffusers' lora_state_dict reads each file (converting kohya's names itself); merged into its UNet by
    PEFT's rule (alpha / r, with alpha = r where a file has none) the output is esd-jax's merged model's."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    workdir, _ = lora_run
    ours = apply_run(None, workdir)[0].unet
    base = esd_jax.load_pipeline(sd1_folder).unet
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder)
    for fmt, path in exported.items():
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        if fmt == "lora-kohya":
            assert set(alphas.values()) == {ALPHA}
            state = convert_unet_state_dict_to_peft(state)
        else:
            assert not alphas
        ranks = {k.removeprefix("unet.").split(".lora_B.")[0]: v.shape[1] for k, v in state.items() if ".lora_B." in k}
        scales = {m: (ALPHA if fmt == "lora-kohya" else r) / r for m, r in ranks.items()}
        got, want = unet_outputs(ours, merged_torch_unet(pipe, state, scales))
        assert rel_err(got, want) <= 1e-4, fmt
        assert rel_err(unet_outputs(base, pipe.unet)[0], want) > 1e-3  # the LoRA changes the output


def test_load_lora_weights_gives_the_merged_model(lora_run, exported, sd1_folder):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs PEFT")
    from diffusers import StableDiffusionPipeline

    workdir, _ = lora_run
    ours = apply_run(None, workdir)[0].unet
    for path in exported.values():
        pipe = StableDiffusionPipeline.from_pretrained(sd1_folder)
        pipe.load_lora_weights(str(path))
        got, want = unet_outputs(ours, pipe.unet)
        assert rel_err(got, want) <= 1e-4, path


def test_the_merged_export_is_base_plus_scale_up_down(lora_run, sd1_folder, tmp_path):
    workdir, path = lora_run
    kohya = load_file(path)
    base = weights.state_dict(esd_jax.load_pipeline(sd1_folder).unet)
    delta = load_file(export_run(workdir, tmp_path / "delta.safetensors", fmt="delta"))
    assert {f"lora_unet_{k.removesuffix('.weight').replace('.', '_')}.alpha" for k in delta} == {
        k for k in kohya if k.endswith(".alpha")
    }
    changed = 0
    for key, got in delta.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        down, up, alpha = (kohya[f"{name}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        product = up.reshape(up.shape[0], RANK).astype(np.float64) @ down.reshape(RANK, -1)
        want = base[key] + alpha / RANK * product.reshape(got.shape)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), key
        changed += not np.array_equal(got, base[key])
    assert changed == len(delta)
    single = export_run(workdir, tmp_path / "single.safetensors", fmt="single-file")
    assert len(load_file(single)) > len(delta)


def test_a_lora_file_samples_at_a_strength(lora_run, sd1_folder):
    """--esd with a LoRA file is the run's merged model at strength 1, the base at 0, the edit reversed at -1."""
    workdir, path = lora_run
    base = esd_jax.load_pipeline(sd1_folder)
    want = weights.state_dict(base.unet)
    merged = weights.state_dict(apply_run(esd_jax.load_pipeline(sd1_folder), workdir)[0].unet)
    for strength in (1.0, 0.0, -1.0):
        pipe = esd_jax.load_pipeline(sd1_folder)
        apply_delta(pipe, path, strength=strength)
        got = weights.state_dict(pipe.unet)
        for key in want:
            expected = want[key] + strength * (merged[key].astype(np.float64) - want[key])
            assert np.abs(got[key] - expected).max() <= 1e-6 * max(np.abs(want[key]).max(), 1e-3), (strength, key)
    pipe = esd_jax.load_pipeline(sd1_folder)
    apply_run(pipe, workdir, strength=0.5)
    halfway = weights.state_dict(pipe.unet)
    key = next(k for k in want if not np.array_equal(merged[k], want[k]))
    assert np.allclose(halfway[key], (want[key] + merged[key]) / 2, atol=1e-6)


def test_strength_needs_a_lora(full_run, lora_run):
    workdir, delta = full_run
    with pytest.raises(UserError, match="trained full weights, not a LoRA"):
        check_erasure(workdir, None, 0.5)
    with pytest.raises(UserError, match="is a delta file, not a LoRA"):
        check_erasure(None, delta, -1.0)
    check_erasure(None, lora_run[1], -1.0)
    with pytest.raises(UserError, match="--lora_strength 1.5: give a strength from -1 to 1"):
        SampleConfig(out="x", prompt="a", lora_strength=1.5).validate()


def test_a_full_weight_run_exports_as_a_lora_by_svd(full_run, tmp_path, capsys):
    """At rank 1 the error is what numpy's SVD of each change leaves; at full rank the LoRA is the change."""
    workdir, delta = full_run
    pipe, _, _, trained, original = restore_run(None, workdir)
    kinds = weights.layouts(pipe.unet)
    after, before = (weights.torch_tensors(s, kinds) for s in (trained, original))
    with pytest.raises(UserError, match="give --rank R"):
        export_run(workdir, tmp_path / "no-rank.safetensors", fmt="lora-kohya")
    residual = total = 0.0
    for key, w in after.items():
        d = w.astype(np.float64) - before[key]
        total += np.sum(d**2)
        residual += np.sum(np.linalg.svd(d, compute_uv=False)[1:] ** 2) if d.ndim == 2 else np.sum(d**2)
    export_run(workdir, tmp_path / "r1.safetensors", fmt="lora-kohya", rank=1)
    printed = capsys.readouterr().out
    assert f"relative error {math.sqrt(residual / total):.4f}" in printed
    full = export_run(workdir, tmp_path / "full.safetensors", fmt="lora-diffusers", rank=64)
    pipe = esd_jax.load_pipeline(read_model(workdir))
    apply_delta(pipe, full)
    got, want = weights.state_dict(pipe.unet), load_file(delta)
    weights_only = [k for k in want if k.endswith(".weight")]
    assert weights_only and all(np.abs(got[k] - want[k]).max() <= 1e-6 for k in weights_only)


def read_model(workdir):
    from esd_jax.run import read_config

    return read_config(workdir).model


@pytest.mark.slow
def test_a_lora_run_resumes_to_the_same_adapters(sd1_folder, tmp_path):
    whole = erase_run(sd1_folder, tmp_path / "whole", iterations=3, lora_rank=RANK)
    erase_run(sd1_folder, tmp_path / "parts", iterations=2, lora_rank=RANK)
    parts = erase_run(sd1_folder, tmp_path / "parts", iterations=3, lora_rank=RANK)
    a, b = load_file(whole), load_file(parts)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.any(a[k]) for k in a if k.endswith("lora_up.weight"))


def test_lora_settings_are_checked():
    for values, message in (
        (dict(lora_rank=-1), "config.lora_rank=-1"),
        (dict(lora_rank=4, lora_alpha=0.0), "config.lora_alpha=0.0"),
    ):
        with pytest.raises(UserError, match=message):
            EraseConfig(concept="red", **values).validate()
