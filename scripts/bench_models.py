"""UNet forward time and peak memory, esd-jax (JAX, jit) against diffusers (PyTorch), same weights.

    python scripts/bench_models.py            # SD-shaped UNet, reduced width, 32x32 latents, batch 2
    python scripts/bench_models.py --full     # the real SD 1.4 UNet config at 64x64 (slow on a CPU)
    python scripts/bench_models.py --full --latent 16   # the same UNet on 16x16 latents (128 px)

Each framework runs in its own subprocess so that peak resident memory (ru_maxrss) is its own;
the peak is reset once the weights are loaded (so loading's transient copies don't count), and
"activation memory" is the peak minus the resident size at that point. The parent writes the random
weights to a safetensors file that both workers read, so the JAX worker never imports PyTorch (whose
libraries alone would add about 190 MB to its resident size).
"""

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD14 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
REDUCED = {**SD14, "sample_size": 32, "block_out_channels": (128, 256, 512, 512)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restarts the peak (ru_maxrss, VmHWM) from the current resident size (Linux 4.0+), after handing
    freed heap back to the OS, so memory freed by loading (or compiling) no longer counts."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def inputs(config: dict, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    size = config["sample_size"]
    return (
        rng.standard_normal((batch, 4, size, size)).astype(np.float32),
        np.full((batch,), 500),
        rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32),
    )


def save_random_weights(config: dict, path: Path) -> tuple[int, int]:
    """A seeded random diffusers UNet's state dict, written to `path`; returns (parameters, attn2 parameters)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    save_file(model.state_dict(), str(path))
    return (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for name, p in model.named_parameters() if "attn2" in name),
    )


def load_torch_unet(config: dict, path: Path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    model = UNet2DConditionModel(**config).eval()
    model.load_state_dict(load_file(str(path)))
    return model


def load_jax_unet(config: dict, path: Path):
    from flax import nnx

    from esd_jax import weights
    from esd_jax.models.unet import UNet2DConditionModel, UNetConfig

    model = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(config), rngs=nnx.Rngs(0)))
    weights.load_state_dict(model, weights.read_safetensors(path), source=str(path))
    return model


def run_torch(config: dict, weights_file: Path, batch: int, repeats: int) -> dict:
    import torch

    model = load_torch_unet(config, weights_file)
    x, t, c = (torch.tensor(a) for a in inputs(config, batch))
    reset_peak()
    base = rss_mb()
    with torch.inference_mode():
        model(x, t, c)
        start = time.perf_counter()
        for _ in range(repeats):
            out = model(x, t, c).sample
        seconds = (time.perf_counter() - start) / repeats
    return dict(seconds=seconds, activation_mb=peak_mb() - base, peak_mb=peak_mb(), checksum=float(out.abs().mean()))


def run_jax(config: dict, weights_file: Path, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(load_jax_unet(config, weights_file))
    forward = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))
    x, t, c = (jnp.asarray(a) for a in inputs(config, batch))
    reset_peak()
    base = rss_mb()
    forward(state, x, t, c).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward(state, x, t, c).block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return dict(seconds=seconds, activation_mb=peak_mb() - base, peak_mb=peak_mb(), checksum=float(jnp.abs(out).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full SD 1.4 UNet at 64x64 latents")
    parser.add_argument("--latent", type=int, help="latent side (default: 64 with --full, else 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = SD14 if args.full else REDUCED
    if args.latent:
        config = {**config, "sample_size": args.latent}
    if args.worker:
        runner = run_jax if args.worker == "jax" else run_torch
        print(json.dumps(runner(config, args.weights, args.batch, args.repeats)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = Path(tmp) / "unet.safetensors"
        parameters, _ = save_random_weights(config, weights_file)
        for worker in ("torch", "jax"):
            cmd = [sys.executable, __file__, "--worker", worker, "--weights", str(weights_file)]
            cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)] + (["--full"] if args.full else [])
            cmd += ["--latent", str(config["sample_size"])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[worker] = json.loads(out.stdout.strip().splitlines()[-1])
    j, t = results["jax"], results["torch"]
    name = "SD 1.4 UNet" if args.full else "SD-shaped UNet (128-256-512-512)"
    size = config["sample_size"]
    print(f"{name}, {parameters / 1e6:.1f}M parameters, batch {args.batch}, {size}x{size} latents, float32, CPU")
    print(f"mean of {args.repeats} forwards after one warm-up (compiling) forward; each framework in its own process")
    print(f"{'':22s}{'torch':>10s}{'jax':>10s}{'jax/torch':>11s}")
    print(f"{'seconds / forward':22s}{t['seconds']:10.3f}{j['seconds']:10.3f}{j['seconds'] / t['seconds']:11.2f}")
    print(
        f"{'activation MB':22s}{t['activation_mb']:10.0f}{j['activation_mb']:10.0f}"
        f"{j['activation_mb'] / t['activation_mb']:11.2f}"
    )
    print(f"{'peak RSS MB':22s}{t['peak_mb']:10.0f}{j['peak_mb']:10.0f}{j['peak_mb'] / t['peak_mb']:11.2f}")
    print(f"output mean |x|: torch {t['checksum']:.6f}, jax {j['checksum']:.6f} (same weights and inputs)")


if __name__ == "__main__":
    main()
