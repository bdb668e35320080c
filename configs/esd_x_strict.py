"""ESD-x-strict on Stable Diffusion 1.4: trains only the cross-attention key and value
projections (attn2.to_k, attn2.to_v).

    esd-jax erase --config configs/esd_x_strict.py --config.concept="Van Gogh" --config.workdir=runs/vangogh-strict
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "CompVis/stable-diffusion-v1-4"
    config.method = "esd-x-strict"
    return config
