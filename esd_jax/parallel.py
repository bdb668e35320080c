"""The device mesh, array placement and multi-host start-up for data-parallel ESD."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


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


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shards an array over the mesh along its largest axis divisible by the device count, if any."""
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
        if shape[a] % n == 0 and shape[a] >= n:
            return P(*[AXIS if i == a else None for i in range(len(shape))])
    return P()


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
