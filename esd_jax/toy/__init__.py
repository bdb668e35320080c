"""The toy world: synthetic shapes whose every attribute is known, its oracle, and the tiny model's trainer.

The trained model ships in `pipeline/` beside this file; the core knows it as `esd_jax.pipeline.EMBEDDED`.
"""
