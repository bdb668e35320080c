"""ESD-all on Stable Diffusion 1.4: trains every Linear and Conv layer of the UNet.

esd-jax erase --config configs/esd_all.py --config.concept="Van Gogh" --config.workdir=runs/vangogh-all
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "CompVis/stable-diffusion-v1-4"
    config.method = "esd-all"
    return config
