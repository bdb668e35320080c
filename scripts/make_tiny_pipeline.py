"""Writes a tiny randomly initialised Stable Diffusion pipeline (diffusers format), without PyTorch.

    python scripts/make_tiny_pipeline.py runs/tiny-sd

Its images are noise, but every esd-jax command runs on it in seconds on a CPU: a smoke test of an
installation, and the shape of a real run (SD 1.x architecture at 1/40 of the width).
"""

import argparse
from pathlib import Path

from esd_jax.pipeline import new_pipeline
from esd_jax.schedulers import SD1_DDIM_CONFIG
from esd_jax.tokenizer import make_clip_tokenizer

WORDS = ["a", "photo", "painting", "of", "by", "red", "green", "blue", "circle", "square", "van", "gogh", "dog"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = make_clip_tokenizer(WORDS, max_length=16)
    pipe = new_pipeline(
        unet_config=dict(
            sample_size=16,
            block_out_channels=[32, 64],
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        vae_config=dict(
            block_out_channels=[16, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=32,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        tokenizer=tokenizer,
        scheduler_config=SD1_DDIM_CONFIG,
        seed=args.seed,
    )
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
