"""Seconds per ESD iteration and peak memory, esd-jax against the official PyTorch recipe, same weights.

    python scripts/bench_esd.py                     # 37.5M-parameter SD-shaped UNet, 32x32 latents, batch 1
    python scripts/bench_esd.py --iterations 16     # more timed iterations (each costs ~k UNet calls a side)
    python scripts/bench_esd.py --torch-grads trained   # torch computes gradients of the trained weights only
    python scripts/bench_esd.py --unet sd14 --iterations 3  # SD 1.4's own UNet (860M), 16x16 latents
    python scripts/bench_esd.py --compile-only      # the memory of only compiling the JAX step

The default takes about 3 minutes on an otherwise idle 2-core CPU, --unet sd14 --iterations 3 about 7
and 11 GB of memory (the PyTorch side's); results are in docs/benchmarks.md.

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
from bench_models import SD14, load_jax_unet, load_torch_unet, peak_mb, reset_peak, rss_mb, save_random_weights

UNETS = {
    # SD 1.x's blocks and 1:2:4:4 channel ratios at a fifth of its width (37.5M parameters).
    "reduced": {**SD14, "sample_size": 32, "block_out_channels": (64, 128, 256, 256)},
    # SD 1.4's own UNet (860M parameters), at 16x16 latents (128 px) so that a CPU runs it in minutes:
    # the size at which the weights, not the frameworks' runtimes, dominate memory.
    "sd14": {**SD14, "sample_size": 16},
}
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


def compile_jax(config: dict) -> dict:
    """Resident memory of a JAX process that only compiles the step, from shapes (no weights, no run):
    the floor under the peak of any implementation that compiles the whole iteration as one program."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from esd_jax import parallel
    from esd_jax.esd import Prompts, initial_state, make_train_step
    from esd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from esd_jax.partition import trainable_filter
    from esd_jax.schedulers import NoiseSchedule

    jax.devices()
    runtime = rss_mb()
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(config), rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, "esd-x"), ...)
    optimizer = optax.adam(LEARNING_RATE)
    state = jax.eval_shape(lambda trainable: initial_state(trainable, optimizer, SEED), trainable)
    embedding = jax.ShapeDtypeStruct((77, config["cross_attention_dim"]), jnp.float32)
    prompts = Prompts(concept=jax.ShapeDtypeStruct((1, *embedding.shape), jnp.float32), erase_from=None, null=embedding)
    mesh = parallel.make_mesh()
    step = make_train_step(graphdef, NoiseSchedule.from_config(SCHEDULER), esd_objective(config), optimizer, mesh, 1)
    reset_peak()
    compiled = step.lower(state, frozen, trainable, prompts).compile()
    peak = peak_mb()
    reset_peak()  # hands the compiler's freed heap back first
    return dict(
        runtime_mb=runtime,
        peak_mb=peak,
        compiled_mb=rss_mb(),
        temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
    )


def run_jax(folder: Path, iterations: int, config: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from esd_jax import parallel
    from esd_jax.esd import Prompts, initial_state, make_train_step, sample_draws
    from esd_jax.partition import trainable_filter
    from esd_jax.schedulers import NoiseSchedule

    jax.devices()
    runtime = rss_mb()
    unet = load_jax_unet(config, folder / "unet.safetensors")
    graphdef, trainable, frozen = nnx.split(unet, trainable_filter(unet, "esd-x"), ...)
    del unet
    original = jax.tree.map(jnp.copy, trainable)
    embeddings = np.load(folder / "prompts.npz")
    prompts = Prompts(concept=embeddings["concept"][None], erase_from=None, null=embeddings["null"])
    # Placed as esd_jax.train places them: the step's outputs come back with these shardings, so
    # unplaced inputs would make the second call compile again.
    mesh = parallel.make_mesh()
    original, frozen, prompts = (parallel.place(x, mesh) for x in (original, frozen, prompts))
    reset_peak()
    base = rss_mb()

    objective = esd_objective(config)
    optimizer = optax.adam(LEARNING_RATE)
    state = parallel.place(initial_state(trainable, optimizer, SEED), mesh)
    step = make_train_step(graphdef, NoiseSchedule.from_config(SCHEDULER), objective, optimizer, mesh, 1)
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
    if step._cache_size() != 1:
        sys.exit(f"the step compiled {step._cache_size()} times; the timings include compiling")

    # The noise each iteration started from, drawn as esd.local_loss_and_grads draws it (the step
    # donated state.rng, hence a new copy of the key).
    def noise(i):
        _, _, keys = sample_draws(jax.random.key_data(jax.random.key(SEED)), jnp.int32(i), 1, DDIM_STEPS, 1)
        return jax.vmap(lambda key: jax.random.normal(key, objective.latent_shape))(keys)

    np.save(folder / "noise.npy", np.stack([np.asarray(noise(i)) for i in range(iterations + 1)]))
    return dict(
        seconds=seconds,
        k=ks,
        loss=losses,
        runtime_mb=runtime,
        base_mb=base,
        peak_mb=max(first_peak, steady_peak),
        steady_peak_mb=steady_peak,
    )


def run_torch(folder: Path, iterations: int, config: dict, ks: list[int], grads: str) -> dict:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401  (imported before measuring)

    runtime = rss_mb()
    base_unet = load_torch_unet(config, folder / "unet.safetensors")
    base_unet.requires_grad_(False)
    esd_unet = load_torch_unet(config, folder / "unet.safetensors")
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
    erase_embeds, null_embeds = (torch.tensor(embeddings[key])[None] for key in ("concept", "null"))
    noises = torch.tensor(np.load(folder / "noise.npy"))
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
        seconds.append(time.perf_counter() - began)
        if i == 0:
            first_peak = peak_mb()
            reset_peak()
    steady_peak = peak_mb()
    return dict(
        seconds=seconds,
        k=list(ks),
        loss=losses,
        runtime_mb=runtime,
        base_mb=base,
        peak_mb=max(first_peak, steady_peak),
        steady_peak_mb=steady_peak,
    )


def worker(name: str, folder: Path, iterations: int, unet: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder), "--iterations", str(iterations)]
    cmd += ["--unet", unet]
    out = subprocess.run(cmd + extra, capture_output=True, text=True)
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
        "--unet", choices=list(UNETS), default="reduced", help="reduced: 37.5M parameters; sd14: SD 1.4's (860M)"
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the JAX step from shapes (no weights) and print that process's memory",
    )
    parser.add_argument("--worker", choices=["jax", "torch", "compile"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = UNETS[args.unet]
    if args.worker == "jax":
        print(json.dumps(run_jax(args.dir, args.iterations, config)))
        return
    if args.worker == "compile":
        print(json.dumps(compile_jax(config)))
        return
    if args.compile_only:
        c = worker("compile", Path(), 0, args.unet, [])
        print(f"compiling the ESD-x step of the {args.unet} UNet from shapes alone, in a process of its own:")
        print(f"  RSS of the JAX runtime before it     {c['runtime_mb']:8.0f} MB")
        print(f"  peak RSS while compiling             {c['peak_mb']:8.0f} MB")
        print(f"  RSS with the compiled step           {c['compiled_mb']:8.0f} MB")
        print(f"  the step's temporaries (XLA)         {c['temp_mb']:8.0f} MB, allocated when it runs")
        return
    if args.worker == "torch":
        print(json.dumps(run_torch(args.dir, args.iterations, config, args.k, args.torch_grads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameters, trained = save_random_weights(config, folder / "unet.safetensors")
        rng = np.random.default_rng(SEED)
        shape = (77, config["cross_attention_dim"])
        np.savez(folder / "prompts.npz", **{key: rng.standard_normal(shape, np.float32) for key in ("concept", "null")})
        j = worker("jax", folder, args.iterations, args.unet, [])
        replay = ["--torch-grads", args.torch_grads, "--k", *map(str, j["k"])]
        t = worker("torch", folder, args.iterations, args.unet, replay)

    size = config["sample_size"]
    print(
        f"ESD-x iteration, SD-shaped UNet {'-'.join(map(str, config['block_out_channels']))}: "
        f"{parameters / 1e6:.1f}M parameters, {trained / 1e6:.1f}M trained (attn2)"
    )
    print(f"batch 1, {size}x{size} latents, float32, CPU, ddim_steps {DDIM_STEPS}, torch grads: {args.torch_grads}")
    timed = j["k"][1:]
    print(
        f"mean of {args.iterations} iterations after a warm-up one, the same k on both sides: "
        f"mean k {np.mean(timed):.1f} (expected {(DDIM_STEPS - 1) / 2:.1f}), k = {timed}"
    )

    def row(label: str, tv: float, jv: float, goal: float | None = None, fmt: str = "10.0f") -> None:
        verdict = "" if goal is None else f"  <= {goal}: {'met' if jv / tv <= goal else 'NOT met'}"
        print(f"{label:34s}{tv:{fmt}}{jv:{fmt}}{jv / tv:11.2f}{verdict}")

    print(f"{'':34s}{'torch':>10s}{'jax':>10s}{'jax/torch':>11s}")
    row("seconds / iteration", np.mean(t["seconds"][1:]), np.mean(j["seconds"][1:]), GOALS["seconds"], "10.2f")
    row("seconds, first iteration", t["seconds"][0], j["seconds"][0], fmt="10.2f")
    row("RSS before the weights (runtime), MB", t["runtime_mb"], j["runtime_mb"])
    row("RSS with weights loaded, MB", t["base_mb"], j["base_mb"])
    row("peak RSS MB", t["peak_mb"], j["peak_mb"], GOALS["peak"])
    row("working set MB (peak - loaded)", t["peak_mb"] - t["base_mb"], j["peak_mb"] - j["base_mb"])
    row("peak RSS MB, timed iterations", t["steady_peak_mb"], j["steady_peak_mb"])
    row("working set MB, timed iterations", t["steady_peak_mb"] - t["base_mb"], j["steady_peak_mb"] - j["base_mb"])
    # Least squares over the timed iterations: the per-DDIM-step cost (one batch-2 UNet call and a
    # scheduler step) and the fixed cost (frozen predictions, trainable forward and backward, Adam).
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


if __name__ == "__main__":
    main()
