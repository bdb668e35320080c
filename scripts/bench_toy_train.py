"""Seconds per step of the toy model's UNet training, esd-jax (scripts/train_toy.py's compiled step) against
the same step in PyTorch diffusers, on the shipped model's weights, the same batches, in one run.

    python scripts/bench_toy_train.py --steps 20

The step is stage 2 of esd_jax.toy.train: encode a batch of world images with the VAE, noise the
latents at a random timestep, predict the noise with the UNet from the trained text encoder's
embedding (captions dropped 10% of the time), min-SNR-weighted MSE, gradient clipping, AdamW on the
UNet and the text encoder, EMA. Both sides time the same number of steps after a warm-up step (JAX: its compilation).
"""

import argparse
import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from esd_jax import pipeline
from esd_jax.config import EMBEDDED_NAME
from esd_jax.pipeline import load_pipeline
from esd_jax.toy import train, world
from esd_jax.toy.model import Networks


def batches(steps: int, size: int, captions) -> list[dict[str, np.ndarray]]:
    out = []
    for step in range(steps + 1):
        b = world.sample(size, (0, 2, step))
        out.append({"images": b.images, "ids": captions(b.captions)})
    return out


def time_jax(data: list[dict], cfg: train.TrainToyConfig) -> float:
    pipe = load_pipeline(EMBEDDED_NAME)
    net = Networks(pipe)
    graphdef, trainable, frozen = nnx.split(net, lambda path, x: path[0] in train.TRAINS["unet"], ...)
    stage = train.unet_stage(cfg, train.Captions(pipe), pipe.vae.scaling_factor)
    stage = dataclasses.replace(stage, graphdef=graphdef)
    state = train.initial_state(trainable, stage, cfg.seed)
    state, metrics = train.train_step(state, frozen, data[0], stage)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for batch in data[1:]:
        state, metrics = train.train_step(state, frozen, batch, stage)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - began) / (len(data) - 1)


def time_torch(data: list[dict], cfg: train.TrainToyConfig) -> float:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import compute_snr

    torch.manual_seed(cfg.seed)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline.EMBEDDED, safety_checker=None)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    vae.requires_grad_(False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    alphas = pipe.scheduler.alphas_cumprod
    null = torch.from_numpy(np.asarray(pipe.tokenizer([""], padding="max_length").input_ids))

    def step(batch: dict) -> None:
        images, ids = torch.from_numpy(batch["images"]), torch.from_numpy(batch["ids"]).long()
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        t = torch.randint(0, len(alphas), (z.shape[0],))
        noise = torch.randn_like(z)
        a = alphas[t][:, None, None, None]
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        drop = torch.rand(z.shape[0]) < cfg.caption_dropout
        ids = torch.where(drop[:, None], null, ids)
        mse = torch.square(unet(x_t, t, text_encoder(ids)[0]).sample - noise).mean(dim=(1, 2, 3))
        weights = torch.ones_like(mse)
        if cfg.snr_gamma:  # diffusers' train_text_to_image.py --snr_gamma, epsilon prediction
            snr = compute_snr(pipe.scheduler, t)
            weights = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (weights * mse).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - cfg.ema_decay)

    step(data[0])
    began = time.perf_counter()
    for batch in data[1:]:
        step(batch)
    return (time.perf_counter() - began) / (len(data) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per framework")
    args = parser.parse_args()
    cfg = train.TrainToyConfig()
    data = batches(args.steps, cfg.batch, train.Captions(load_pipeline(EMBEDDED_NAME)))
    jax_s = time_jax(data, cfg)
    torch_s = time_torch(data, cfg)
    print(f"toy UNet training step, batch {cfg.batch}, {args.steps} steps each")
    print(f"esd-jax  {jax_s:7.3f} s/step")
    print(f"PyTorch  {torch_s:7.3f} s/step")
    print(f"ratio    {jax_s / torch_s:7.2f}x  (esd-jax time / PyTorch time)")


if __name__ == "__main__":
    main()
