"""Images per second, esd-jax's sampler against diffusers' StableDiffusionPipeline, same random weights.

    python scripts/bench_sample.py                 # SD-shaped pipeline, 256 px (32x32 latents), 20 DDIM steps, batch 4
    python scripts/bench_sample.py --batches 4     # more timed batches

The model is SD 1.x's architecture at reduced width: UNet blocks 128-256-256-256 (SD: 320-640-1280-1280)
with 768-wide cross-attention, a 4-level VAE at a quarter of SD's width, and a 4-layer 768-wide CLIP
text encoder; random weights, written once as a diffusers folder that both sides load. Both run the whole
pipeline: text encoding, guided DDIM (scale 7.5, both halves batched into one UNet call, as diffusers
does), VAE decoding, images to host memory. Each framework runs in its own subprocess; one untimed
batch first (JAX compiles there), then `--batches` timed batches.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, BATCH, GUIDANCE = 20, 4, 7.5
WORDS = ["a", "photo", "painting", "of", "by", "red", "green", "blue", "circle", "square", "van", "gogh", "dog"]
PROMPTS = ["a photo of a dog", "a painting by van gogh", "red circle", "a blue square"]
GOAL = 1.5  # jax images/s over torch images/s, at least


def build(folder: Path) -> int:
    """Writes the random pipeline; returns its UNet's parameter count."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from esd_jax.tokenizer import make_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer(WORDS, max_length=77)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=256,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def run_torch(folder: Path, batches: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def batch(seed: int):
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            return pipe(
                PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator, output_type="np"
            ).images

    began = time.perf_counter()
    batch(0)
    first = time.perf_counter() - began
    began = time.perf_counter()
    for i in range(batches):
        images = batch(i + 1)
    seconds = time.perf_counter() - began
    return dict(first=first, seconds=seconds, images=batches * BATCH, shape=list(images.shape))


def run_jax(folder: Path, batches: int) -> dict:
    import esd_jax

    pipe = esd_jax.load_pipeline(folder)

    def run(prompts, seeds):
        return esd_jax.sample(pipe, prompts, seeds=seeds, steps=STEPS, guidance=GUIDANCE, batch_size=BATCH)

    began = time.perf_counter()
    run(PROMPTS, list(range(BATCH)))
    first = time.perf_counter() - began
    began = time.perf_counter()
    images = run(PROMPTS * batches, list(range(BATCH, BATCH * (batches + 1))))
    seconds = time.perf_counter() - began
    return dict(first=first, seconds=seconds, images=batches * BATCH, shape=list(images.shape))


def worker(name: str, folder: Path, batches: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder), "--batches", str(batches)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the {name} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help=f"timed batches of {BATCH} images after a warm-up one")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_jax if args.worker == "jax" else run_torch
        print(json.dumps(run(args.dir, args.batches)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        parameters = build(Path(tmp))
        j = worker("jax", Path(tmp), args.batches)
        t = worker("torch", Path(tmp), args.batches)

    print(
        f"sampling, SD-shaped pipeline (UNet 128-256-256-256, {parameters / 1e6:.1f}M parameters), "
        f"{j['shape'][1]} px, {STEPS} DDIM steps, guidance {GUIDANCE}, batch {BATCH}, float32, CPU"
    )
    print(f"{args.batches} timed batches after an untimed one (JAX compiles in it)")
    tps, jps = t["images"] / t["seconds"], j["images"] / j["seconds"]
    print(f"{'':28s}{'torch':>10s}{'jax':>10s}{'jax/torch':>11s}")
    verdict = "met" if jps / tps >= GOAL else "NOT met"
    print(f"{'images / second':28s}{tps:10.3f}{jps:10.3f}{jps / tps:11.2f}  >= {GOAL}: {verdict}")
    print(f"{'first batch, seconds':28s}{t['first']:10.1f}{j['first']:10.1f}")


if __name__ == "__main__":
    main()
