"""esd-jax: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023) in JAX."""

__all__ = ["StableDiffusion", "load_pipeline"]


def __getattr__(name: str):
    # Imported on first use, so `esd-jax --help` and the tokenizer don't wait for JAX and the models.
    if name in __all__:
        from esd_jax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'esd_jax' has no attribute {name!r}")
