"""esd-jax: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023) in JAX."""

import glob
import os
from pathlib import Path

# libtpu, where installed (`esd-jax plan` compiles for TPUs with it), loads in every JAX program that
# imports Flax. On a host without TPUs it would look for its TPU VM's hosts and warn at length: it is
# told there is one, this host, and that other processes may load it too, since here it only compiles.
LIBTPU_OFF_TPU = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # any known name: a plan's topology decides what it compiles for
}
GOOGLE_PCI_VENDOR = "0x1ae0"  # how JAX finds TPU chips on a TPU VM's bus


def _without_tpus() -> bool:
    return not any(Path(p).read_text().strip() == GOOGLE_PCI_VENDOR for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


if _without_tpus():
    for _key, _value in LIBTPU_OFF_TPU.items():
        os.environ.setdefault(_key, _value)

__all__ = ["StableDiffusion", "load_pipeline", "sample"]
_MODULES = {"StableDiffusion": "pipeline", "load_pipeline": "pipeline", "sample": "sampling.sampler"}


def __getattr__(name: str):
    # Imported on first use, so `esd-jax --help` and the tokenizer don't wait for JAX and the models.
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"esd_jax.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'esd_jax' has no attribute {name!r}")
