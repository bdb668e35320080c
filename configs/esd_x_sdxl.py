"""ESD-x on Stable Diffusion XL base 1.0 at its native 1024 px: cross-attention only (attn2, 545.7 M of
its 2.57 B parameters), computing in bfloat16 with the frozen weights stored in bfloat16 (the trained
weights and Adam stay float32), the frozen weights, originals and Adam sharded over the devices.

    esd-jax erase --config configs/esd_x_sdxl.py --config.concept="Van Gogh" --config.workdir=runs/vangogh-xl

The official esd_sdxl.py's iterations, learning rate and partial-sampling guidance, with the paper's
eta 1 (docs/methods.md, "On SDXL").
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "stabilityai/stable-diffusion-xl-base-1.0"
    config.method = "esd-x"
    config.iterations = 200
    config.learning_rate = 2e-4
    config.start_guidance = 2.0
    config.dtype = "bfloat16"
    config.frozen_dtype = "bfloat16"
    config.shard_params = True
    return config
