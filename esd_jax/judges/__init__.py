"""Judges of the images a prompt CSV makes (NudeNet, an ImageNet classifier, CLIP; LPIPS and FID of the
erased model's images to the base model's), which `esd-jax evaluate --prompts` runs (evaluate.py)."""
