"""Seconds per ESD iteration and peak memory, esd-jax against the official PyTorch recipe, same weights.

    python scripts/bench_esd.py                     # 37.5M-parameter SD-shaped UNet, 32x32 latents, batch 1
    python scripts/bench_esd.py --iterations 16     # more timed iterations (each costs ~k UNet calls a side)
    python scripts/bench_esd.py --torch-grads trained   # torch computes gradients of the trained weights only
    python scripts/bench_esd.py --unet sd14 --iterations 3  # SD 1.4's own UNet (860M), 16x16 latents
    python scripts/bench_esd.py --compile-only      # the memory of only compiling the JAX step
    python scripts/bench_esd.py --trajectories 4    # also the fast mode's seconds, amortised over 1000 iterations
    python scripts/bench_esd.py --flops             # TFLOP of the recipe and the fast mode, SD 1.4 at 512 px
    python scripts/bench_esd.py --unet sd14 --latent 64 --dtype bfloat16 --iterations 3   # on a GPU: 512 px

The default takes about 3 minutes on an otherwise idle 2-core CPU, --unet sd14 --iterations 3 about 7
and 11 GB of memory (the PyTorch side's), --flops 10 seconds; results are in docs/benchmarks.md.

One ESD-x iteration: k guided DDIM steps from noise with the frozen UNet, its predictions e_c and e_0 at
step k, the trainable UNet's prediction, MSE against e_c - 2 (e_c - e_0), backward, Adam on attn2. The
PyTorch side is written as the official esd_sd.py does it (github.com/rohitgandikota/erasing): two full
diffusers UNets, the pipeline's Python loop of UNet calls and scheduler steps (utils/sd_utils.py), e_c and
e_0 as separate no_grad calls, and every parameter of the trainable UNet requiring grad (only the attn2
ones are in the optimizer). The text encoder is left out on both sides: prompts are random embeddings.
Both sides sample with DDIM (the official run uses the SD 1.4 pipeline's default PNDM scheduler).

k is uniform in 0..ddim_steps-1 and the iteration's cost grows with it, so both sides run the same k:
JAX draws its own inside the compiled step, reports them in its metrics, and the PyTorch worker replays
them, starting each iteration from the same noise, so the two loss sequences match too.

Each framework runs in its own subprocess (JAX first, then PyTorch) so its resident memory is its own.
Each uses its default device: JAX its first, PyTorch CUDA where it has one. With --dtype bfloat16 both
compute in bfloat16 as each project trains: esd-jax keeps float32 weights and Adam state (esd_jax.train),
the official esd_sd.py casts both UNets to bfloat16 and runs Adam on them.

TFLOP/s: 2 x the multiply-adds of esd-jax's programs for the iteration's k (as --flops counts them, in a
process of its own on the CPU), over its seconds; the PyTorch side does the same work and more (every
gradient), so both are divided by the same count. --json PATH writes the results and these rows.

--trajectories T: the JAX worker then also samples a fast-mode cache of T trajectories and times the
cached steps (esd_jax.trajectories, made and called as esd_jax.train does); a run of --fast-iterations I
iterations pays ceil(I / --refresh-every) caches, or one. The PyTorch side stays the per-iteration recipe.

--flops: XLA's cost analysis of each program an iteration runs, lowered from shapes alone (no weights)
for an accelerator, beside 2 x the multiply-adds of every matrix product and convolution in its jaxpr.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_models import SD14, load_torch_unet, peak_mb, reset_peak, rss_mb, save_random_weights

UNETS = {
    # SD 1.x's blocks and 1:2:4:4 channel ratios at a fifth of its width (37.5M parameters).
    "reduced": {**SD14, "sample_size": 32, "block_out_channels": (64, 128, 256, 256)},
    # SD 1.4's own UNet (860M parameters), at 16x16 latents (128 px) so that a CPU runs it in minutes:
    # the size at which the weights, not the frameworks' runtimes, dominate memory.
    "sd14": {**SD14, "sample_size": 16},
    # scripts/make_tiny_pipeline.py's UNet: a smoke test of every code path, in seconds.
    "tiny": {
        **SD14,
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    },
}
DTYPES = ("float32", "bfloat16")
# SD 1.4's scheduler_config (CompVis/stable-diffusion-v1-4), read as a DDIMScheduler.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# esd-jax's defaults (esd_jax/config.py), the official esd_sd.py's: guidance_scale 3, 50 steps, and its
# negative_guidance 2 with e_c as the base, which is eta = 1 with e_0 as the base here.
DDIM_STEPS, START_GUIDANCE, LEARNING_RATE, SEED = 50, 3.0, 1e-5, 0
GOALS = {"seconds": 0.8, "peak": 0.6}  # jax/torch at most
# XLA's cost analysis counts a loop's body once, and CPUs run long attentions one head at a time in a
# lax.map (esd_jax/models/attention.py): lowered for an accelerator instead, each program has XLA's
# attention and convolutions and no loop but partial_sample's, as where SD runs at 512 px.
FLOPS_PLATFORM = "cuda"


def esd_objective(config: dict):
    from esd_jax.esd import Objective

    return Objective(
        negative_guidance=1.0,
        start_guidance=START_GUIDANCE,
        ddim_steps=DDIM_STEPS,
        xt_model="frozen",
        latent_shape=(config["in_channels"], config["sample_size"], config["sample_size"]),
        erase_from=False,
    )


def abstract_unet(config: dict, dtype: str):
    """The UNet of `config` from shapes alone, computing in `dtype` with float32 weights (as esd_jax.train)."""
    import jax.numpy as jnp
    from flax import nnx

    from esd_jax.models.unet import UNet2DConditionModel, UNetConfig

    return nnx.eval_shape(
        lambda: UNet2DConditionModel(UNetConfig.from_dict(config), dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    )


def compile_jax(config: dict, dtype: str) -> dict:
    """Resident memory of a JAX process that only compiles the step, from shapes (no weights, no run):
    the floor under the peak of any implementation that compiles the whole iteration as one program."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from esd_jax import parallel
    from esd_jax.esd import Prompts, initial_state, make_train_step
    from esd_jax.partition import trainable_filter
    from esd_jax.schedulers import NoiseSchedule

    jax.devices()
    runtime = rss_mb()
    unet = abstract_unet(config, dtype)
    graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, "esd-x"), ...)
    optimizer = optax.adam(LEARNING_RATE)
    state = jax.eval_shape(lambda trainable: initial_state(trainable, optimizer, SEED), trainable)
    embedding = jax.ShapeDtypeStruct((77, config["cross_attention_dim"]), jnp.float32)
    concept = jax.ShapeDtypeStruct((1, *embedding.shape), jnp.float32)
    prompts = Prompts(
        concept={"encoder_hidden_states": concept}, erase_from=None, null={"encoder_hidden_states": embedding}
    )
    mesh = parallel.make_mesh()
    step = make_train_step(graphdef, NoiseSchedule.from_config(SCHEDULER), esd_objective(config), optimizer, mesh, 1)
    reset_peak()
    compiled = [f.lower(*args).compile() for f, args in step.programs(state, frozen, trainable, prompts)]
    peak = peak_mb()
    reset_peak()  # hands the compiler's freed heap back first
    return dict(
        runtime_mb=runtime,
        peak_mb=peak,
        compiled_mb=rss_mb(),
        temp_mb=max(c.memory_analysis().temp_size_in_bytes for c in compiled) / 2**20,
    )


def flop_programs(config: dict, dtype: str) -> dict:
    """name -> (function, abstract arguments, loops in its HLO) of each program an ESD-x iteration is made of,
    from shapes alone, batch 1."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from esd_jax.esd import esd_loss, esd_target, partial_sample
    from esd_jax.partition import trainable_filter
    from esd_jax.schedulers import NoiseSchedule

    unet = abstract_unet(config, dtype)
    graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, "esd-x"), ...)
    objective = esd_objective(config)
    schedule = NoiseSchedule.from_config(SCHEDULER)
    x = jax.ShapeDtypeStruct((1, *objective.latent_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    embedding = jax.ShapeDtypeStruct((1, 77, config["cross_attention_dim"]), jnp.float32)
    c = {"encoder_hidden_states": embedding}
    null = {"encoder_hidden_states": jax.ShapeDtypeStruct(embedding.shape[1:], jnp.float32)}

    def guided_steps(original, frozen, noise, k, c, null):
        return partial_sample(nnx.merge(graphdef, original, frozen), schedule, objective, noise, k, c, null)

    def target(original, frozen, x_t, t, c, null):
        return esd_target(nnx.merge(graphdef, original, frozen), objective, x_t, t, c, c, null)

    def forward_backward(trainable, frozen, x_t, t, c, target):
        return jax.value_and_grad(esd_loss)(trainable, trainable, frozen, graphdef, x_t, t, c, target)

    # partial_sample's loop runs k steps, a number XLA cannot know, so its cost is one guided step's.
    return {
        "(a) guided DDIM step, esd.partial_sample": (guided_steps, (trainable, frozen, x, t, c, null), 1),
        "(b) esd.esd_target": (target, (trainable, frozen, x, t, c, null), 0),
        "(c) value_and_grad(esd.esd_loss), attn2": (forward_backward, (trainable, frozen, x, t, c, x), 0),
    }


def count_flops(fn, args, loops: int) -> dict:
    """XLA's FLOPs of `fn` lowered for FLOPS_PLATFORM, and 2 x the multiply-adds of its jaxpr."""
    import jax

    from esd_jax.flops import flops

    began = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    # The lowered module's cost analysis: compiling it would take a GPU, and on a CPU minutes and gigabytes
    # for the same count.
    lowered = traced.lower(lowering_platforms=(FLOPS_PLATFORM,))
    xla = lowered.cost_analysis()["flops"]
    seconds = time.perf_counter() - began
    found = lowered.as_text().count("stablehlo.while")
    if found != loops:
        sys.exit(f"{found} loops in the lowered program, not {loops}: XLA's count would leave iterations out")
    return dict(xla=xla, macs=flops(traced, FLOPS_PLATFORM), seconds=seconds)


def report_flops(config: dict, dtype: str, trajectories: int, iterations: int, refresh_every: int) -> None:
    began = time.perf_counter()
    counts = {name: count_flops(*program) for name, program in flop_programs(config, dtype).items()}
    step, target, backward = (c["xla"] / 1e12 for c in counts.values())
    size = config["sample_size"]
    blocks = "-".join(map(str, config["block_out_channels"]))
    print(f"TFLOP of one ESD-x iteration's programs, SD-shaped UNet {blocks}, {size}x{size} latents ({8 * size} px)")
    print(f"{dtype}, batch 1, ddim_steps N = {DDIM_STEPS}, lowered for {FLOPS_PLATFORM} from shapes (no weights)")
    print(f"{'per call':44s}{'XLA':>9s}{'2 x MACs':>10s}{'XLA/MACs':>10s}{'lowering s':>12s}")
    for name, c in counts.items():
        xla, macs = c["xla"] / 1e12, c["macs"] / 1e12
        print(f"{name:44s}{xla:9.3f}{macs:10.3f}{xla / macs:10.3f}{c['seconds']:12.1f}")

    def line(label: str, tflop: float) -> None:
        print(f"  {label:62s}{tflop:9.3f}")

    k = (DDIM_STEPS - 1) / 2
    recipe = k * step + target + backward
    from esd_jax.esd import caches_in

    caches = caches_in(iterations, refresh_every)
    sampled = caches * trajectories * DDIM_STEPS
    fast = sampled * step / iterations + backward
    print("per iteration (XLA's counts)")
    # At batch 1 the sampling loop runs to the sample's own k, so E[largest k] = E[k].
    line(f"recipe: E[k] = (N - 1) / 2 = {k} x (a) + (b) + (c)", recipe)
    line(f"  of which sampling, {k} x (a)", k * step)
    fresh = f"a fresh cache every {refresh_every}" if refresh_every else "one cache"
    print(f"  fast: {trajectories} trajectories x N steps, {fresh}, over a run of {iterations} iterations")
    line(f"  {caches} x {trajectories} x {DDIM_STEPS} = {sampled} x (a) / {iterations} + (c)", fast)
    line(f"  of which sampling, {sampled / iterations:g} x (a)", sampled * step / iterations)
    line("recipe / fast", recipe / fast)
    print("the estimate to compare with, at 512 px: ~43 TFLOP per recipe iteration, ~39 of it sampling")
    print(f"{time.perf_counter() - began:.0f} s in all, tracing and lowering on a CPU")


def run_jax(folder: Path, iterations: int, config: dict, dtype: str, trajectories: int, refresh_every: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from esd_jax import parallel, weights
    from esd_jax.esd import Prompts, initial_state, make_train_step, sample_draws
    from esd_jax.partition import trainable_filter
    from esd_jax.schedulers import NoiseSchedule

    device = jax.devices()[0]
    runtime = rss_mb()
    unet = abstract_unet(config, dtype)
    path = folder / "unet.safetensors"
    weights.load_state_dict(unet, weights.read_safetensors(path), source=str(path))
    graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, "esd-x"), ...)
    del unet
    original = jax.tree.map(jnp.copy, trainable)
    embeddings = np.load(folder / "prompts.npz")
    prompts = Prompts(
        concept={"encoder_hidden_states": embeddings["concept"][None]},
        erase_from=None,
        null={"encoder_hidden_states": embeddings["null"]},
    )
    # Placed as esd_jax.train places them: the step's outputs come back with these shardings, so
    # unplaced inputs would make the second call compile again.
    mesh = parallel.make_mesh()
    original, frozen, prompts = (parallel.place(x, mesh) for x in (original, frozen, prompts))
    reset_peak()
    base = rss_mb()

    objective = esd_objective(config)
    schedule = NoiseSchedule.from_config(SCHEDULER)
    optimizer = optax.adam(LEARNING_RATE)
    state = parallel.place(initial_state(trainable, optimizer, SEED), mesh)
    step = make_train_step(graphdef, schedule, objective, optimizer, mesh, 1)
    seconds, ks, losses = [], [], []
    for i in range(iterations + 1):
        began = time.perf_counter()
        state, metrics = step(state, frozen, original, prompts)
        loss, k = jax.device_get((metrics["loss"], metrics["k"]))
        seconds.append(time.perf_counter() - began)
        ks.append(int(k[0]))
        losses.append(float(loss))
        if i == 0:
            first_peak = peak_mb()
            reset_peak()  # from here on: the steady state, without the compiler
    steady_peak = peak_mb()
    if compiles(step) != 1:
        sys.exit(f"the step compiled {compiles(step)} times; the timings include compiling")

    # The noise each iteration started from, drawn as esd.local_pairs draws it (the step
    # donated state.rng, hence a new copy of the key).
    def noise(i):
        _, _, keys = sample_draws(jax.random.key_data(jax.random.key(SEED)), jnp.int32(i), 1, DDIM_STEPS, 1)
        return jax.vmap(lambda key: jax.random.normal(key, objective.latent_shape))(keys)

    np.save(folder / "noise.npy", np.stack([np.asarray(noise(i)) for i in range(iterations + 1)]))
    # After the recipe's measurements, so that its peaks are its own.
    fast = {}
    if trajectories:
        made = (graphdef, schedule, objective, optimizer, mesh)
        fast = time_fast_mode(made, (original, frozen, prompts), iterations, trajectories, refresh_every)
    # None on a CPU, where the RSS rows already hold the arrays.
    device_peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return dict(
        device=device.device_kind,
        seconds=seconds,
        k=ks,
        loss=losses,
        runtime_mb=runtime,
        base_mb=base,
        peak_mb=max(first_peak, steady_peak),
        steady_peak_mb=steady_peak,
        device_peak_mb=device_peak and device_peak / 2**20,
        **fast,
    )


def time_fast_mode(made: tuple, inputs: tuple, iterations: int, trajectories: int, refresh_every: int) -> dict:
    """Seconds to compile the fast mode's trajectory sampler, to sample one cache, and of each cached step
    (the first compiles), made from the recipe's (graphdef, schedule, objective, optimizer, mesh) and
    called on its placed (original, frozen, prompts) as esd_jax.train does."""
    import jax
    import jax.numpy as jnp

    from esd_jax import parallel
    from esd_jax.esd import initial_state, make_train_step
    from esd_jax.trajectories import make_trajectory_sampler

    graphdef, schedule, objective, optimizer, mesh = made
    original, frozen, prompts = inputs
    state = parallel.place(initial_state(jax.tree.map(jnp.copy, original), optimizer, SEED), mesh)
    sampler = make_trajectory_sampler(graphdef, schedule, objective, mesh, trajectories)
    index = parallel.place(np.int32(0), mesh)
    began = time.perf_counter()
    sample = sampler.lower(original, frozen, prompts, state.rng, index).compile()
    compiled = time.perf_counter()
    cache = jax.block_until_ready(sample(original, frozen, prompts, state.rng, index))
    sampled = time.perf_counter()
    step = make_train_step(
        graphdef, schedule, objective, optimizer, mesh, 1, trajectories=trajectories, refresh_every=refresh_every
    )
    seconds = []
    for _ in range(iterations + 1):
        began_step = time.perf_counter()
        state, metrics = step(state, frozen, original, prompts, cache)
        jax.device_get(metrics["loss"])
        seconds.append(time.perf_counter() - began_step)
    if compiles(step) != 1:
        sys.exit(f"the cached step compiled {compiles(step)} times; the timings include compiling")
    return dict(sampler_compile_seconds=compiled - began, cache_seconds=sampled - compiled, fast_seconds=seconds)


def compiles(step) -> int:
    """How often the step's programs compiled, the most of the two (esd.TrainStep)."""
    return max(f._cache_size() for f in (step.pairs, step.update))


def run_torch(folder: Path, iterations: int, config: dict, dtype: str, ks: list[int], grads: str) -> dict:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401  (imported before measuring)

    cuda = torch.cuda.is_available()
    device, dtype = "cuda" if cuda else "cpu", getattr(torch, dtype)
    # CUDA runs asynchronously: an iteration ends when its last kernel (Adam's) does.
    synchronize = torch.cuda.synchronize if cuda else lambda: None
    runtime = rss_mb()
    # esd_sd.py's load_sd_models: loaded in float32, then moved and cast.
    base_unet = load_torch_unet(config, folder / "unet.safetensors").to(device, dtype)
    base_unet.requires_grad_(False)
    esd_unet = load_torch_unet(config, folder / "unet.safetensors").to(device, dtype)
    # esd_sd.py's get_esd_trainable_parameters for esd-x.
    trained = [
        p
        for name, module in esd_unet.named_modules()
        if type(module).__name__ in ("Linear", "Conv2d") and "attn2" in name
        for p in module.parameters()
    ]
    if grads == "trained":
        esd_unet.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=LEARNING_RATE)
    criteria = torch.nn.MSELoss()
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(DDIM_STEPS)
    embeddings = np.load(folder / "prompts.npz")
    erase_embeds, null_embeds = (torch.tensor(embeddings[key])[None].to(device, dtype) for key in ("concept", "null"))
    noises = torch.tensor(np.load(folder / "noise.npy")).to(device, dtype)
    reset_peak()
    base = rss_mb()

    seconds, losses = [], []
    for i, k in enumerate(ks):
        began = time.perf_counter()
        optimizer.zero_grad()
        t_k = scheduler.timesteps[k]
        with torch.no_grad():
            # The pipeline's denoising loop, stopped after k steps (sd_utils.esd_sd_call, run_till_timestep=k).
            latents = noises[i] * scheduler.init_noise_sigma
            prompt_embeds = torch.cat([null_embeds, erase_embeds])
            for t in scheduler.timesteps[:k]:
                latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred = base_unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + START_GUIDANCE * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            xt = latents
            noise_pred_erase = base_unet(xt, t_k, encoder_hidden_states=erase_embeds, return_dict=False)[0]
            noise_pred_null = base_unet(xt, t_k, encoder_hidden_states=null_embeds, return_dict=False)[0]
        noise_pred_esd_model = esd_unet(xt, t_k, encoder_hidden_states=erase_embeds, return_dict=False)[0]
        loss = criteria(noise_pred_esd_model, noise_pred_erase - 2.0 * (noise_pred_erase - noise_pred_null))
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        synchronize()
        seconds.append(time.perf_counter() - began)
        if i == 0:
            first_peak = peak_mb()
            reset_peak()
    steady_peak = peak_mb()
    return dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        seconds=seconds,
        k=list(ks),
        loss=losses,
        runtime_mb=runtime,
        base_mb=base,
        peak_mb=max(first_peak, steady_peak),
        steady_peak_mb=steady_peak,
        device_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    )


def worker(name: str, args: argparse.Namespace, folder: Path, extra: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder), "--iterations", str(args.iterations)]
    cmd += ["--unet", args.unet, "--latent", str(args.latent), "--dtype", args.dtype]
    began = time.perf_counter()
    out = subprocess.run(cmd + extra, capture_output=True, text=True, env=env)
    # On stderr as it happens: where the time went, should a time limit stop the run.
    print(f"bench_esd.py: the {name} worker took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if out.returncode:
        sys.exit(f"the {name} worker failed:\n{out.stderr[-4000:]}")
    # The 1-minute load average as the worker ends: it alone accounts for about the core count.
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations after the warm-up one")
    parser.add_argument(
        "--torch-grads",
        choices=["all", "trained"],
        default="all",
        help="which esd UNet parameters require grad in torch: all (as esd_sd.py) or the trained attn2 ones",
    )
    parser.add_argument(
        "--unet",
        choices=list(UNETS),
        help="reduced: 37.5M parameters; sd14: SD 1.4's (860M); tiny: 0.8M. Default: reduced, sd14 with --flops",
    )
    parser.add_argument("--latent", type=int, help="latent side (default: sd14 16, tiny 16, reduced 32; --flops 64)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of both sides")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the JAX step from shapes (no weights) and print that process's memory",
    )
    parser.add_argument(
        "--flops", action="store_true", help="count the FLOPs of the recipe and the fast mode from shapes, no run"
    )
    parser.add_argument(
        "--trajectories",
        type=int,
        default=0,
        help="also time the fast mode with this many cached trajectories (--flops: default 20)",
    )
    parser.add_argument(
        "--fast-iterations", type=int, default=1000, help="the run the fast mode's cache is amortised over"
    )
    parser.add_argument("--refresh-every", type=int, default=0, help="the fast mode's fresh cache every M iterations")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", choices=["jax", "torch", "compile", "flops"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.unet = args.unet or ("sd14" if args.flops else "reduced")
    args.latent = args.latent or (64 if args.flops else UNETS[args.unet]["sample_size"])
    config = {**UNETS[args.unet], "sample_size": args.latent}
    # Each down block but the last halves the latents, and an up block doubles them back.
    multiple = 2 ** (len(config["down_block_types"]) - 1)
    if args.latent < multiple or args.latent % multiple:
        parser.error(f"--latent {args.latent}: the {args.unet} UNet takes multiples of {multiple}")
    if args.iterations < 1:
        parser.error(f"--iterations {args.iterations}: time at least one iteration")
    if args.flops:
        trajectories = args.trajectories or 20
        report_flops(config, args.dtype, trajectories, args.fast_iterations, args.refresh_every)
        return
    fast = ["--trajectories", str(args.trajectories), "--refresh-every", str(args.refresh_every)]
    if args.worker == "jax":
        print(json.dumps(run_jax(args.dir, args.iterations, config, args.dtype, args.trajectories, args.refresh_every)))
        return
    if args.worker == "compile":
        print(json.dumps(compile_jax(config, args.dtype)))
        return
    if args.worker == "flops":
        programs = flop_programs(config, args.dtype)
        print(json.dumps({"programs": {name: count_flops(*program) for name, program in programs.items()}}))
        return
    if args.compile_only:
        c = worker("compile", args, Path(), [])
        print(f"compiling the ESD-x step of the {args.unet} UNet from shapes alone, in a process of its own:")
        print(f"  RSS of the JAX runtime before it     {c['runtime_mb']:8.0f} MB")
        print(f"  peak RSS while compiling             {c['peak_mb']:8.0f} MB")
        print(f"  RSS with the compiled step           {c['compiled_mb']:8.0f} MB")
        print(f"  the step's temporaries (XLA)         {c['temp_mb']:8.0f} MB, allocated when it runs")
        return
    if args.worker == "torch":
        print(json.dumps(run_torch(args.dir, args.iterations, config, args.dtype, args.k, args.torch_grads)))
        return

    # Lowered for an accelerator whatever runs it, so the CPU does, and the GPU's memory stays free; first,
    # so that a failure costs seconds.
    f = worker("flops", args, Path(), [], env={**os.environ, "JAX_PLATFORMS": "cpu"})["programs"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameters, trained = save_random_weights(config, folder / "unet.safetensors")
        rng = np.random.default_rng(SEED)
        shape = (77, config["cross_attention_dim"])
        np.savez(folder / "prompts.npz", **{key: rng.standard_normal(shape, np.float32) for key in ("concept", "null")})
        j = worker("jax", args, folder, fast)
        replay = ["--torch-grads", args.torch_grads, "--k", *map(str, j["k"])]
        t = worker("torch", args, folder, replay)
    report(args, config, (parameters, trained), j, t, f)


def report(args: argparse.Namespace, config: dict, sizes: tuple[int, int], j: dict, t: dict, f: dict) -> None:
    size = config["sample_size"]
    title = [
        f"ESD-x iteration, SD-shaped UNet {'-'.join(map(str, config['block_out_channels']))}: "
        f"{sizes[0] / 1e6:.1f}M parameters, {sizes[1] / 1e6:.1f}M trained (attn2)",
        f"batch 1, {size}x{size} latents ({8 * size} px), {args.dtype}, torch on {t['device']}, jax on {j['device']}, "
        f"ddim_steps {DDIM_STEPS}, torch grads: {args.torch_grads}",
    ]
    print("\n".join(title))
    timed = j["k"][1:]
    print(
        f"mean of {args.iterations} iterations after a warm-up one, the same k on both sides: "
        f"mean k {np.mean(timed):.1f} (expected {(DDIM_STEPS - 1) / 2:.1f}), k = {timed}"
    )

    def row(label: str, tv: float, jv: float, goal: float | None = None, fmt: str = "10.0f") -> None:
        verdict = "" if goal is None else f"  <= {goal}: {'met' if jv / tv <= goal else 'NOT met'}"
        print(f"{label:34s}{tv:{fmt}}{jv:{fmt}}{jv / tv:11.2f}{verdict}")

    # TFLOP of the programs esd-jax runs, which PyTorch's iteration also runs (and more: every gradient).
    step, target, backward = (c["macs"] / 1e12 for c in f.values())
    tflop = np.mean([k * step + target + backward for k in timed])
    seconds = np.mean(t["seconds"][1:]), np.mean(j["seconds"][1:])
    print(f"{'':34s}{'torch':>10s}{'jax':>10s}{'jax/torch':>11s}")
    row("seconds / iteration", *seconds, GOALS["seconds"], "10.2f")
    row(f"TFLOP/s ({tflop:.2f} TFLOP / iteration)", tflop / seconds[0], tflop / seconds[1], fmt="10.2f")
    row("seconds, first iteration", t["seconds"][0], j["seconds"][0], fmt="10.2f")
    row("RSS before the weights (runtime), MB", t["runtime_mb"], j["runtime_mb"])
    row("RSS with weights loaded, MB", t["base_mb"], j["base_mb"])
    row("peak RSS MB", t["peak_mb"], j["peak_mb"], GOALS["peak"])
    row("working set MB (peak - loaded)", t["peak_mb"] - t["base_mb"], j["peak_mb"] - j["base_mb"])
    row("peak RSS MB, timed iterations", t["steady_peak_mb"], j["steady_peak_mb"])
    row("working set MB, timed iterations", t["steady_peak_mb"] - t["base_mb"], j["steady_peak_mb"] - j["base_mb"])
    if t["device_peak_mb"] and j["device_peak_mb"]:
        row("peak GPU memory MB", t["device_peak_mb"], j["device_peak_mb"])
    # Least squares over the timed iterations: the per-DDIM-step cost (one batch-2 UNet call and a
    # scheduler step) and the fixed cost (frozen predictions, trainable forward and backward, Adam).
    if len(set(timed)) > 1:
        (tb, ta), (jb, ja) = (np.polyfit(timed, r["seconds"][1:], 1) for r in (t, j))
        row("  fit a + b k: a, fixed seconds", ta, ja, fmt="10.2f")
        row("  fit a + b k: b, seconds / DDIM step", tb, jb, fmt="10.3f")
    diff = max(abs(a - b) / abs(b) for a, b in zip(j["loss"], t["loss"], strict=True))
    print(f"loss, same weights, k and noise: max relative difference {diff:.1e} over {len(t['loss'])} iterations")
    busy = max(t["load"], j["load"]) > (os.cpu_count() or 1) + 0.5
    print(
        f"1-minute load average as each worker ended: torch {t['load']:.1f}, jax {j['load']:.1f} on "
        f"{os.cpu_count()} cores"
        + (
            ": other processes shared the CPU, and torch's spinning OpenMP threads slow down far more than "
            "XLA's under sharing; rerun on a quiet machine before reading the time ratio"
            if busy
            else ""
        )
    )
    rows = [
        ("ESD-x iteration, PyTorch (official loop)", seconds[0], tflop),
        ("ESD-x iteration, esd-jax", seconds[1], tflop),
    ]
    if args.trajectories:
        rows += report_fast(j, seconds[0], args, step, backward)
    if args.json:
        results = dict(title=title, rows=rows, jax=j, torch=t, flops=f, args=vars(args))
        args.json.write_text(json.dumps(results, indent=1, default=str))


def report_fast(j: dict, torch_seconds: float, args: argparse.Namespace, step: float, backward: float) -> list:
    """Prints the fast mode's times; returns its (label, seconds, TFLOP) rows, from the TFLOP of a guided
    step and of the trained forward and backward."""
    from esd_jax.esd import caches_in

    trajectories, iterations, refresh_every = args.trajectories, args.fast_iterations, args.refresh_every
    caches = caches_in(iterations, refresh_every)
    cached = np.mean(j["fast_seconds"][1:])
    fast = j["cache_seconds"] * caches / iterations + cached
    recipe = np.mean(j["seconds"][1:])
    sampled = trajectories * DDIM_STEPS * step
    fast_tflop = caches * sampled / iterations + backward

    def line(label: str, seconds: float, tflop: float | None = None, note: str = "") -> None:
        rate = "" if tflop is None else f"{tflop / seconds:8.2f} TFLOP/s"
        print(f"  {label:56s}{seconds:8.2f} s{rate}{note}")

    fresh = f"a fresh cache every {refresh_every}" if refresh_every else "one cache"
    print(
        f"fast mode: {trajectories} trajectories x {DDIM_STEPS} steps, {fresh}, over a run of {iterations} iterations"
    )
    line("compiling the trajectory sampler", j["sampler_compile_seconds"])
    line(f"sampling a cache: {DDIM_STEPS} UNet calls at batch {2 * trajectories}", j["cache_seconds"], sampled)
    line(
        f"cached step, mean of {len(j['fast_seconds']) - 1} after a warm-up one",
        cached,
        backward,
        f" (first {j['fast_seconds'][0]:.2f} s)",
    )
    line(f"{caches} x the cache / {iterations} + the cached step", fast, fast_tflop, " / iteration")
    print(f"{'':34s}{'torch':>10s}{'jax fast':>10s}{'fast/torch':>11s}")
    print(f"{'seconds / iteration':34s}{torch_seconds:10.2f}{fast:10.2f}{fast / torch_seconds:11.3f}")
    print(f"jax recipe / jax fast: {recipe:.2f} / {fast:.2f} s = {recipe / fast:.1f}")
    return [
        (f"fast mode: sampling a cache, {trajectories} x {DDIM_STEPS} steps", j["cache_seconds"], sampled),
        ("fast mode: cached step", cached, backward),
        (f"fast mode: an iteration of a {iterations}-iteration run", fast, fast_tflop),
    ]


if __name__ == "__main__":
    main()
