"""A human-readable summary of a loaded pipeline (`esd-jax info`)."""

import json

import numpy as np
from flax import nnx

from esd_jax.pipeline import load_pipeline


def parameter_count(module: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def describe(model: str, dtype: str = "float32") -> str:
    pipe = load_pipeline(model, dtype=dtype)
    lines = [f"model: {pipe.source}", f"compute dtype: {dtype}"]
    for name in pipe.networks:
        lines.append(f"{name}: {parameter_count(getattr(pipe, name)):,} parameters")
    lines.append(f"native resolution: {pipe.native_resolution} px")
    lines.append(f"tokenizer: {len(pipe.tokenizer)} tokens, max length {pipe.tokenizer.model_max_length}")
    lines.append(f"scheduler: {json.dumps({k: v for k, v in pipe.scheduler_config.items() if not k.startswith('_')})}")
    return "\n".join(lines)
