"""Adversarial prompts against an erased model: the compiled search (search.py) and `esd-jax attack`, its
images, judges and report (folder.py)."""
