"""Flax NNX networks of a Stable Diffusion pipeline, keyed to the PyTorch checkpoint layout."""
