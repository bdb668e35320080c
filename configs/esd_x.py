"""ESD-x on Stable Diffusion 1.4: trains cross-attention only (attn2), the paper's choice for
artistic styles, which prompts name explicitly.

    esd-jax erase --config configs/esd_x.py --config.concept="Van Gogh" --config.workdir=runs/vangogh
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "CompVis/stable-diffusion-v1-4"
    config.method = "esd-x"
    return config
