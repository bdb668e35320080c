"""esd-jax: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023) in JAX."""

__all__ = ["StableDiffusion", "load_pipeline", "sample"]
_MODULES = {"StableDiffusion": "pipeline", "load_pipeline": "pipeline", "sample": "sampling.sampler"}


def __getattr__(name: str):
    # Imported on first use, so `esd-jax --help` and the tokenizer don't wait for JAX and the models.
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"esd_jax.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'esd_jax' has no attribute {name!r}")
