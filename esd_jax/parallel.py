"""The device mesh, array placement and multi-host start-up for data-parallel ESD."""

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esd_jax.models.layers import AXIS  # the mesh's one axis: layers gather sharded weights over it


def initialize_distributed() -> None:
    """Joins a multi-host run; a no-op on one host. Every host runs the same command.

    ESD_JAX_MULTIHOST=1: `jax.distributed.initialize()` finds its peers itself (Cloud TPU pod
    slices, SLURM, Open MPI). JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID name
    them explicitly (any cluster; the tests run 2 processes on localhost this way).
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # Hosts without accelerators (and tests) reduce over gloo; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("ESD_JAX_MULTIHOST") == "1":
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """All devices of all hosts on one axis."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def fsdp_axis(shape: tuple[int, ...], n: int) -> int | None:
    """The axis an array is sharded on over n devices: its largest one divisible by n, if any."""
    for a in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[a] % n == 0 and shape[a] >= n:
            return a
    return None


def sharded_on(axis: int | None, rank: int) -> P:
    """The spec of an array of `rank` axes sharded over the mesh on `axis` (None: replicated)."""
    return P() if axis is None else P(*[AXIS if i == axis else None for i in range(rank)])


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shards an array over the mesh along its largest axis divisible by the device count, if any."""
    return sharded_on(fsdp_axis(shape, n), len(shape))


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def gathered_where_used(state, n: int):
    """`state`'s parameters marked with the axis `shardings(shard=True)` shards them on (metadata `gather`),
    so that a layer inside the step gathers each from the mesh where it uses it (models.layers.value)
    rather than the step gathering the whole model at once: FSDP."""
    return jax.tree.map(lambda v: v.replace(gather=fsdp_axis(v.shape, n)), state, is_leaf=is_variable)


def local_specs(state):
    """The shard_map specs of `state` as `gathered_where_used` marked it: each parameter's own."""

    def spec(v):
        return sharded_on(v.get_metadata().get("gather") if is_variable(v) else None, len(v.shape))

    return jax.tree.map(spec, state, is_leaf=is_variable)


def mean_gradients(grads, n: int):
    """The mesh's mean of each device's gradients, inside a shard_map. A parameter gathered where it is
    used (its metadata `gather`) has its gradient summed over the devices into each device's shard already,
    by the gather's transpose (a reduce-scatter), and is divided by n; the others are averaged here."""

    def mean(g):
        if is_variable(g) and g.get_metadata().get("gather") is not None:
            return g.replace(g[...] / n)
        return jax.lax.pmean(g, AXIS)

    return jax.tree.map(mean, grads, is_leaf=is_variable)


def restructured(tree, like):
    """`tree`'s arrays in the structure of `like`: a tree marked by `gathered_where_used` as it was before."""
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))


def shardings(tree, mesh: Mesh, *, shard: bool = False):
    """The NamedSharding of every array of `tree` (arrays or ShapeDtypeStructs): replicated, or sharded
    FSDP-style when `shard`."""
    n = mesh.devices.size

    def sharding(x):
        shape = x.shape if hasattr(x, "shape") else np.shape(x)
        return NamedSharding(mesh, fsdp_spec(shape, n) if shard else P())

    return jax.tree.map(sharding, tree)


def place(tree, mesh: Mesh, *, shard: bool = False):
    """Puts a pytree of arrays on the mesh: replicated, or sharded FSDP-style when `shard`."""
    return jax.device_put(tree, shardings(tree, mesh, shard=shard))


def is_main_process() -> bool:
    return jax.process_index() == 0
