"""Judges of the images a prompt CSV makes (NudeNet, an ImageNet classifier, CLIP), which
`esd-jax evaluate --prompts` runs (evaluate.py)."""
