"""Images per second, esd-jax's sampler against diffusers' StableDiffusionPipeline, same random weights.

    python scripts/bench_sample.py                 # SD-shaped pipeline, 256 px (32x32 latents), 20 DDIM steps, batch 4
    python scripts/bench_sample.py --batches 4     # more timed batches
    python scripts/bench_sample.py --model sd14 --dtype bfloat16   # on a GPU: SD 1.4's networks, 512 px
    python scripts/bench_sample.py --model tiny    # a smoke test: 1/40 of SD's width, 32 px, seconds

The default model is SD 1.x's architecture at reduced width: UNet blocks 128-256-256-256 (SD: 320-640-1280-1280)
with 768-wide cross-attention, a 4-level VAE at a quarter of SD's width, and a 4-layer 768-wide CLIP
text encoder; --model sd14 has SD 1.4's UNet, VAE and text encoder (CLIP ViT-L/14) configs, with a
vocabulary of the prompts' few words. Random weights, written once as a diffusers folder that both sides
load. Both run the whole pipeline: text encoding, guided DDIM (scale 7.5, both halves batched into one UNet
call, as diffusers does), VAE decoding, images to host memory. Each framework runs in its own subprocess,
on its default device (JAX its first, PyTorch CUDA where it has one), computing in --dtype (esd-jax with
float32 weights, diffusers with its weights cast, as each loads a pipeline for that dtype); one untimed
batch first (JAX compiles there), then `--batches` timed batches.

TFLOP/s: 2 x the multiply-adds of esd-jax's compiled batch (text encoder, the guided steps, VAE decoder),
counted from its jaxpr as bench_esd.py counts them, over each side's seconds. --json PATH writes the results.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_esd import FLOPS_PLATFORM, UNETS
from bench_models import SD14

STEPS, BATCH, GUIDANCE = 20, 4, 7.5
DTYPES = ("float32", "bfloat16", "float16")
SD_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
PIPELINES = {
    # scripts/make_tiny_pipeline.py's networks: a batch in seconds on a CPU.
    "tiny": dict(
        unet=UNETS["tiny"],
        vae=dict(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    "reduced": dict(
        unet=dict(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, sample_size=256, **SD_VAE_BLOCKS),
        text=dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=12),
    ),
    # CompVis/stable-diffusion-v1-4's unet, vae and text_encoder configs.
    "sd14": dict(
        unet=SD14,
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, **SD_VAE_BLOCKS),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}
WORDS = ["a", "photo", "painting", "of", "by", "red", "green", "blue", "circle", "square", "van", "gogh", "dog"]
PROMPTS = ["a photo of a dog", "a painting by van gogh", "red circle", "a blue square"]
GOAL = 1.5  # jax images/s over torch images/s, at least


def build(folder: Path, model: str) -> int:
    """Writes the random pipeline; returns its UNet's parameter count."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from esd_jax.tokenizer import make_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer(WORDS, max_length=77)
    configs = PIPELINES[model]
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(latent_channels=4, **configs["vae"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            **configs["text"],
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


def run_torch(folder: Path, batches: int, dtype: str) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
    ).to("cuda" if cuda else "cpu")
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
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return dict(device=device, first=first, seconds=seconds, images=batches * BATCH, shape=list(images.shape))


def batch_flop(pipe) -> int:
    """2 x the multiply-adds of one compiled batch of esd-jax's sampler, from shapes."""
    import jax
    import jax.numpy as jnp

    from esd_jax.flops import flops
    from esd_jax.sampling.sampler import Sampler, generate_batch

    sampler = Sampler(pipe, steps=STEPS, guidance=GUIDANCE, batch_size=BATCH)
    ids = (jax.ShapeDtypeStruct((BATCH, pipe.tokenizer.model_max_length), jnp.int32),)
    latents = jax.ShapeDtypeStruct((BATCH, *sampler.settings.latent_shape), jnp.float32)
    statics = dict(graphdefs=sampler.graphdefs, settings=sampler.settings, mesh=sampler.mesh)
    traced = generate_batch.trace(sampler.states, ids, sampler.null_ids, sampler.times, latents, **statics)
    return flops(traced, FLOPS_PLATFORM)


def run_jax(folder: Path, batches: int, dtype: str) -> dict:
    import jax

    import esd_jax

    pipe = esd_jax.load_pipeline(folder, dtype=dtype)

    def run(prompts, seeds):
        return esd_jax.sample(pipe, prompts, seeds=seeds, steps=STEPS, guidance=GUIDANCE, batch_size=BATCH)

    began = time.perf_counter()
    run(PROMPTS, list(range(BATCH)))
    first = time.perf_counter() - began
    began = time.perf_counter()
    images = run(PROMPTS * batches, list(range(BATCH, BATCH * (batches + 1))))
    seconds = time.perf_counter() - began
    return dict(
        device=jax.devices()[0].device_kind,
        first=first,
        seconds=seconds,
        images=batches * BATCH,
        shape=list(images.shape),
        flop=batch_flop(pipe),
    )


def worker(name: str, args: argparse.Namespace, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder), "--batches", str(args.batches)]
    began = time.perf_counter()
    out = subprocess.run(cmd + ["--dtype", args.dtype], capture_output=True, text=True)
    # On stderr as it happens: where the time went, should a time limit stop the run.
    print(f"bench_sample.py: the {name} worker took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if out.returncode:
        sys.exit(f"the {name} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help=f"timed batches of {BATCH} images after a warm-up one")
    parser.add_argument("--model", choices=list(PIPELINES), default="reduced", help="the random pipeline's networks")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of both sides")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batches < 1:
        parser.error(f"--batches {args.batches}: time at least one batch")
    if args.worker:
        run = run_jax if args.worker == "jax" else run_torch
        print(json.dumps(run(args.dir, args.batches, args.dtype)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        parameters = build(Path(tmp), args.model)
        j = worker("jax", args, Path(tmp))
        t = worker("torch", args, Path(tmp))

    blocks = "-".join(map(str, PIPELINES[args.model]["unet"]["block_out_channels"]))
    title = [
        f"sampling, SD-shaped pipeline (UNet {blocks}, {parameters / 1e6:.1f}M parameters), {j['shape'][1]} px, "
        f"{STEPS} DDIM steps, guidance {GUIDANCE}, batch {BATCH}, {args.dtype}, torch on {t['device']}, "
        f"jax on {j['device']}",
    ]
    print(title[0])
    print(f"{args.batches} timed batches after an untimed one (JAX compiles in it)")
    tps, jps = t["images"] / t["seconds"], j["images"] / j["seconds"]
    tflop = j["flop"] / BATCH / 1e12  # per image
    print(f"{'':28s}{'torch':>10s}{'jax':>10s}{'jax/torch':>11s}")
    verdict = "met" if jps / tps >= GOAL else "NOT met"
    print(f"{'images / second':28s}{tps:10.3f}{jps:10.3f}{jps / tps:11.2f}  >= {GOAL}: {verdict}")
    print(f"{f'TFLOP/s ({tflop:.3f} / image)':28s}{tflop * tps:10.2f}{tflop * jps:10.2f}")
    print(f"{'first batch, seconds':28s}{t['first']:10.1f}{j['first']:10.1f}")
    if args.json:
        rows = [
            (f"sampling, diffusers, an image of a batch of {BATCH}", 1 / tps, tflop),
            (f"sampling, esd-jax, an image of a batch of {BATCH}", 1 / jps, tflop),
        ]
        results = dict(title=title, rows=rows, jax=j, torch=t, args=vars(args))
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
