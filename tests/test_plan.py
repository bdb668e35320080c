"""`esd-jax plan`: the erase step and the sampler compiled for a TPU topology on this CPU (libtpu), checked
against counts made without esd-jax: parameter bytes from the PyTorch model, FLOPs from PyTorch's counter."""

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from conftest import SHAPES
from esd_jax import cli, plan
from esd_jax.config import default_config
from esd_jax.pipeline import KNOWN_ROOT

pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu: pip install 'jax[tpu]==<jax version>'")

ESD_X = str(Path(__file__).parents[1] / "configs" / "esd_x.py")

TOPOLOGY = "v5e:2x2"  # 4 chips on one host
# conftest's SD 1.x shape with channels and widths in multiples of 128, TPU's tile, so that XLA's layout
# pads no weight much.
UNET = SHAPES["sd1"]["unet"] | dict(
    sample_size=16, block_out_channels=(128, 256), cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32
)
TEXT = dict(
    architectures=["CLIPTextModel"],
    hidden_size=128,
    intermediate_size=512,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=16,
    vocab_size=1024,
    hidden_act="quick_gelu",
    projection_dim=128,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
VAE = dict(
    block_out_channels=[128, 128],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=32,
    layers_per_block=1,
    sample_size=32,
)
SCHEDULER = json.loads((KNOWN_ROOT / "stable-diffusion-v1" / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory):
    """A diffusers folder of config files and no weights or tokenizer: all that `plan` reads."""
    root = tmp_path_factory.mktemp("configs-only")
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": UNET,
        "text_encoder/config.json": TEXT,
        "vae/config.json": VAE,
        "scheduler/scheduler_config.json": SCHEDULER,
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


def torch_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def erase_config(model, **overrides):
    from esd_jax.config import EraseConfig

    config = default_config()
    config.model = str(model)
    config.concept = "a|b"
    config.ddim_steps = 10
    config.iterations = 100
    for key, value in overrides.items():
        setattr(config, key, value)
    return EraseConfig.from_config_dict(config)


@pytest.fixture(scope="module")
def recipe_plan(configs_only):
    return plan.plan_erase(erase_config(configs_only), TOPOLOGY)


def test_the_step_arguments_are_the_weights_optimizer_and_prompts_counted_from_pytorch(recipe_plan):
    unet = torch_unet()
    params = {name: p.numel() for name, p in unet.named_parameters()}
    trained = 4 * sum(n for name, n in params.items() if "attn2" in name)  # float32
    frozen = 4 * sum(params.values()) - trained
    adam = 2 * trained + 4  # mu, nu and the step count
    prompts = 4 * (2 + 1) * TEXT["max_position_embeddings"] * TEXT["hidden_size"]  # two concepts and ""
    counters = 4 + 8  # the step and the run's key
    pairs_out = 2 * 4 * 4 * 16 * 16 * 4 // 4 + 2 * 4  # a device's x_t and target, float32; concept and k
    memory = recipe_plan.memory
    assert memory["trained weights (esd-x)"] == memory["their originals"] == trained
    assert memory["frozen weights"] == frozen and memory["optimizer state (Adam)"] == adam
    assert memory["prompt embeddings"] == prompts
    # Each program takes what it uses (XLA drops the rest): the sampling the frozen model, the update
    # the trained one, Adam and the pairs.
    pairs, update = recipe_plan.programs
    assert pairs.argument_bytes == pytest.approx(frozen + trained + prompts + counters, rel=0.01)
    assert update.argument_bytes == pytest.approx(frozen + trained + adam + prompts + counters + pairs_out, rel=0.01)
    resident = frozen + 2 * trained + adam + prompts
    assert recipe_plan.peak_bytes >= resident + max(pairs.temp_bytes, update.temp_bytes)
    for program in (pairs, update):  # the 16x16 latents' self-attention on Pallas' flash kernel
        assert "tpu_custom_call" in program.hlo
    assert recipe_plan.topo.devices == 4 and recipe_plan.topo.chip.name == "v5e"


@pytest.mark.slow
def test_a_lora_plan_holds_the_adapters_and_no_copy_of_the_originals(configs_only):
    unet = torch_unet()
    layers = [m for n, m in unet.named_modules() if "attn2" in n and isinstance(m, torch.nn.Linear)]
    adapters = 4 * 4 * sum(m.in_features + m.out_features for m in layers)  # rank 4, float32
    adapted = 4 * sum(m.weight.numel() for m in layers)
    params = 4 * sum(p.numel() for p in unet.parameters())
    adam = 2 * adapters + 4
    prompts = 4 * (2 + 1) * TEXT["max_position_embeddings"] * TEXT["hidden_size"]
    found = plan.plan_erase(erase_config(configs_only, lora_rank=4), TOPOLOGY)
    memory = found.memory
    assert memory["LoRA adapters (rank 4, esd-x)"] == adapters
    assert memory["frozen weights the adapters adapt"] == adapted
    assert memory["frozen weights"] + adapted == params  # the UNet once: the adapted weights are not copied
    assert memory["optimizer state (Adam)"] == adam
    pairs, update = found.programs
    pairs_out = 2 * 4 * 4 * 16 * 16 * 4 // 4 + 2 * 4
    assert update.argument_bytes == pytest.approx(params + adapters + adam + prompts + 12 + pairs_out, rel=0.01)


def test_flops_per_unet_call_match_pytorchs_count(recipe_plan):
    (call,) = recipe_plan.calls  # the sampling loop's: 2 (CFG) x 1 sample per device
    x = torch.zeros(2, 4, UNET["sample_size"], UNET["sample_size"])
    context = torch.zeros(2, TEXT["max_position_embeddings"], TEXT["hidden_size"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch_unet()(x, torch.tensor([500, 500]), encoder_hidden_states=context)
    assert call.math_flops == pytest.approx(counter.get_total_flops(), rel=0.10)
    # XLA's count adds the elementwise work, and the chip's layout pads conv_in's and conv_out's 4
    # latent channels to its 128-wide tiles.
    assert call.math_flops < call.flops < 1.5 * call.math_flops


def test_an_iteration_counts_the_sampling_loop_at_its_expected_length(recipe_plan):
    (call,) = recipe_plan.calls
    share, update = recipe_plan.shares
    # E[k] + 1 (the target's turn) for one sample per device, k uniform in 0..9
    assert share.calls == pytest.approx(5.5)
    assert recipe_plan.flops == pytest.approx(share.program.flops + 4.5 * call.flops + update.program.flops)
    # the devices wait for the slowest: E[largest of 4 k] = sum_m 1 - (m / 10) ** 4
    assert share.slowest_calls == pytest.approx(1 + sum(1 - (m / 10) ** 4 for m in range(1, 10)))
    compute, memory, bound = recipe_plan.seconds
    chip = recipe_plan.topo.chip
    slowest_flops = share.program.flops + (share.slowest_calls - 1) * call.flops  # XLA's, the larger count here
    assert compute == pytest.approx((slowest_flops + update.program.flops) / chip.bf16_flops)
    assert bound >= max(compute, memory)


@pytest.mark.slow
def test_the_fast_mode_plans_sharded_bfloat16_weights_its_sampler_and_the_cached_step(configs_only):
    settings = dict(trajectories=6, shard_params=True, frozen_dtype="bfloat16")
    found = plan.plan_erase(erase_config(configs_only, **settings), TOPOLOGY)
    sampler, pairs, update = found.programs
    # 6 trajectories padded to 8 over 4 devices, 2 each: 10 steps of x_t and target, float32, and a concept
    cache = 2 * 10 * 2 * (4 * 16 * 16) * 4 + 2 * 4
    assert found.memory["trajectory cache"] == cache
    assert pairs.argument_bytes > cache
    assert found.shares[2].times == pytest.approx(1 / 100) and found.shares[2].calls == 10

    # each weight sharded over the 4 devices where a dimension divides by 4, else whole on each
    def per_device(itemsize: int, trained: bool) -> int:
        return sum(
            itemsize * p.numel() // (4 if any(d % 4 == 0 for d in p.shape) else 1)
            for name, p in torch_unet().named_parameters()
            if ("attn2" in name) == trained
        )

    assert found.memory["frozen weights"] == per_device(2, trained=False)  # bfloat16
    # the trained weights too, float32, and Adam's two moments as they are
    trained = per_device(4, trained=True)
    assert found.memory["trained weights (esd-x)"] == trained
    assert found.memory["optimizer state (Adam)"] == 2 * trained + 4


def test_a_plan_names_the_tpu_compilers_flags(recipe_plan):
    """LIBTPU_INIT_ARGS changes what compiling costs (docs/accelerators.md), so a plan keeps it beside the time."""
    assert recipe_plan.topo.libtpu_flags == os.environ.get("LIBTPU_INIT_ARGS", "")

    def with_flags(flags: str) -> plan.Plan:
        return dataclasses.replace(recipe_plan, topo=dataclasses.replace(recipe_plan.topo, libtpu_flags=flags))

    flags = "--xla_jf_convolution_performance_target=0.95"
    assert plan.report(with_flags(flags)).splitlines()[-1] == f"  with LIBTPU_INIT_ARGS={flags}"
    assert with_flags(flags).as_json()["libtpu_flags"] == flags
    assert "LIBTPU_INIT_ARGS" not in plan.report(with_flags(""))


def test_a_run_that_does_not_fit_is_one_line_and_a_non_zero_exit(configs_only, recipe_plan, monkeypatch, capsys):
    tiny = dataclasses.replace(recipe_plan.topo, chip=plan.Chip("v5e", 2**20, 197e12, 819e9))  # 1 MiB of HBM
    monkeypatch.setattr(plan, "plan_erase", lambda cfg, name: dataclasses.replace(recipe_plan, topo=tiny))
    args = ["esd-jax", "plan", "--config", ESD_X, f"--config.model={configs_only}", "--config.concept=a"]
    code = cli.main([*args, f"--topology={TOPOLOGY}"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "peak, of the 1.0 MiB there" in captured.out
    assert err[0].startswith("error: does not fit:") and "--config.dtype=bfloat16" in err[0]
    assert "--config.frozen_dtype=bfloat16" in err[0] and "--config.shard_params=True" in err[0]


def test_a_program_the_tpu_compiler_gives_up_on_is_one_line_and_a_non_zero_exit(configs_only, monkeypatch, capsys):
    # the first line of what libtpu raised for SDXL's ESD-u update on v5e:2x4
    xla = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space sflag. "
        "Used 2.1K of 2.0K sflag. Exceeded sflag capacity by 92B."
    )

    def gives_up(lowered):
        raise jax.errors.JaxRuntimeError(f"{xla}\n\nProgram sflag requirement 2.1K:")

    monkeypatch.setattr(jax.stages.Lowered, "compile", gives_up)
    args = ["esd-jax", "plan", "--config", ESD_X, f"--config.model={configs_only}", "--config.concept=a"]
    code = cli.main([*args, f"--topology={TOPOLOGY}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: does not fit: the TPU compiler cannot compile erase step") and xla in err[0]


def host_memory_kib(field: str) -> int:
    """A memory figure of this process as Linux counts it (/proc/self/status, in KiB)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


def test_plan_sample_compiles_the_sampler_and_writes_json(configs_only, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--model", str(configs_only), "--topology", TOPOLOGY, "--batch_size", "6", "--steps", "5"]
    resident = host_memory_kib("VmRSS")
    assert cli.main(["esd-jax", "plan", "sample", *args, "--json", str(out)]) == 0
    found = json.loads(out.read_text())
    assert found["unit"] == "batch of 8 images" and found["fits"]  # 6 rounded up to the 4 devices
    assert found["unet_calls"][0]["name"] == "UNet call, batch 4"  # 2 images per device, guided
    assert found["compile_cpu_seconds"] > 0
    # the host's peak so far, in bytes: at least what the process held before, at most the kernel's peak since
    assert resident * 1024 <= found["host_peak_bytes"] <= host_memory_kib("VmHWM") * 1024
    printed, gib = capsys.readouterr().out, found["host_peak_bytes"] / 2**30
    assert "compile on this host: sampler" in printed
    assert f"CPU seconds, {gib:.2f} GiB of its memory at the peak" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v5e:3x7"], "--topology 'v5e:3x7'"),
        ([], "give --topology"),
    ],
)
def test_bad_topologies_are_one_line(configs_only, capsys, args, message):
    config = ["--config", ESD_X, f"--config.model={configs_only}", "--config.concept=a"]
    code = cli.main(["esd-jax", "plan", *config, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_known_hub_ids_plan_without_a_download():
    pipe = plan.abstract_pipeline("CompVis/stable-diffusion-v1-4")
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(pipe.unet)))
    assert count == 859_520_964  # diffusers' UNet2DConditionModel of SD 1.4


@pytest.fixture(scope="module")
def sdxl_configs(tmp_path_factory):
    """A configs-only SDXL folder of conftest's tiny shape."""
    from conftest import SDXL_UNET

    root = tmp_path_factory.mktemp("sdxl-configs")
    text = TEXT | dict(max_position_embeddings=16, hidden_size=32, projection_dim=32, num_attention_heads=4)
    files = {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
        "unet/config.json": SDXL_UNET,
        "text_encoder/config.json": text,
        "text_encoder_2/config.json": text | dict(architectures=["CLIPTextModelWithProjection"], hidden_size=48),
        "vae/config.json": VAE,
        "scheduler/scheduler_config.json": SCHEDULER,
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


@pytest.mark.slow
def test_sdxl_prompts_are_its_joined_states_pooled_text_and_time_ids(sdxl_configs):
    """Each SDXL prompt conditions on 16 tokens x (32 + 48) joined states, 32 pooled and 6 time ids; the
    carried SDXL base configs build diffusers' 2.57 B-parameter UNet."""
    pipe = plan.abstract_pipeline(sdxl_configs)
    shapes = plan.prompt_shapes(pipe, 2, 0)
    assert {k: v.shape for k, v in shapes.concept.items()} == {
        "encoder_hidden_states": (2, 16, 80),
        "text_embeds": (2, 32),
        "time_ids": (2, 6),
    }
    assert shapes.erase_from is None and shapes.null["time_ids"].shape == (6,)

    base = plan.abstract_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(base.unet)))
    assert count == 2_567_463_684 and base.native_resolution == 1024 and base.zero_null


@pytest.mark.slow
def test_sdxl_plans_its_step(sdxl_configs):
    found = plan.plan_erase(erase_config(sdxl_configs), TOPOLOGY)
    # two concepts and "", float32
    assert found.memory["prompt embeddings"] == 4 * 3 * (16 * 80 + 32 + 6)
    assert found.fits and found.calls[0].math_flops > 0
