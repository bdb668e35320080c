"""ESD-u on Stable Diffusion 1.4: trains everything but cross-attention, the paper's choice for
concepts that appear without being named (nudity, objects).

    esd-jax erase --config configs/esd_u.py --config.concept="nudity" --config.workdir=runs/nudity
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "CompVis/stable-diffusion-v1-4"
    config.method = "esd-u"
    return config
