"""FLOPs as a program's math counts them: 2 x the multiply-adds of its matrix products and convolutions,
read from the shapes in its jaxpr, whatever compiles it.

XLA's own cost analysis counts the same products plus every elementwise operation, but only for programs
it can see into: a Pallas kernel is a custom call to it (its forward carries an estimate, its backward
none), and a TPU compile pads channels to the chip's tiles. This count is the one to compare across
hardware and with PyTorch's FLOP counter.
"""

import math

from jax.extend.core import ClosedJaxpr, Jaxpr


def multiply_adds(jaxpr: Jaxpr, platform: str) -> int:
    """The multiply-adds of every matrix product and convolution in `jaxpr`: a scan's body times its length,
    a while loop's body once (as XLA counts it: the caller knows how often it runs), a Pallas kernel's body
    once per grid point, of platform_dependent's branches the one `platform` takes, of other conds the
    costlier."""
    total = 0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contracted, _), _ = params["dimension_numbers"]
            out = math.prod(eqn.outvars[0].aval.shape)
            total += out * math.prod(eqn.invars[0].aval.shape[d] for d in contracted)
        elif name == "conv_general_dilated":
            rhs_spec = params["dimension_numbers"].rhs_spec  # (output features, input features, *window)
            out = math.prod(eqn.outvars[0].aval.shape)
            total += out * math.prod(eqn.invars[1].aval.shape[d] for d in rhs_spec[1:])
        elif name == "cond":
            counts = [multiply_adds(branch.jaxpr, platform) for branch in params["branches"]]
            chosen = params.get("branches_platforms")
            if chosen is None:
                total += max(counts)
            else:
                total += next(n for n, ps in zip(counts, chosen, strict=True) if ps is None or platform in ps)
        elif name == "pallas_call":
            total += math.prod(params["grid_mapping"].grid) * multiply_adds(params["jaxpr"], platform)
        else:
            inner = sum(multiply_adds(sub, platform) for sub in sub_jaxprs(params))
            total += inner * (params["length"] if name == "scan" else 1)
    return total


def sub_jaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, Jaxpr):
                yield v


def flops(traced, platform: str) -> float:
    """2 x the multiply-adds of a traced program (`jax.jit(f).trace(...)`) as it runs on `platform`."""
    return 2.0 * multiply_adds(traced.jaxpr.jaxpr, platform)
