"""`esd-jax plan`: the erase step (or the sampler) compiled for a TPU topology on any host, from the
model's configs alone, and what it needs per chip: memory against the chip's HBM, FLOPs and bytes per
iteration, the iteration time they bound on the chip, the whole run's, and the time compiling took.

JAX compiles for TPUs it does not have through libtpu (`pip install "jax[tpu]==<jax's version>"`):
jax.experimental.topologies describes the slice's devices, a Mesh is made of them, and the programs are
lowered from ShapeDtypeStructs placed as a run places its arrays and compiled by the TPU compiler.

XLA's cost analysis counts a loop's body once, and the recipe's sampling loop runs a data-dependent
number of times, so each program's loop body (one UNet call) is compiled on its own too and its cost
added for the loop's other expected iterations (esd.expected_loop_calls).
"""

import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esd_jax import conditioning, flops, parallel
from esd_jax.config import EraseConfig
from esd_jax.errors import UserError
from esd_jax.esd import (
    Prompts,
    caches_in,
    expected_loop_calls,
    initial_state,
    make_erase_step,
    shares_the_loop,
    step_inputs,
)
from esd_jax.files import atomic_file
from esd_jax.parallel import AXIS
from esd_jax.partition import split_for_erase
from esd_jax.pipeline import StableDiffusion, abstract_pipeline
from esd_jax.schedulers import NoiseSchedule
from esd_jax.train import exhausted_as, side_by_side
from esd_jax.trajectories import make_trajectory_sampler, padded_count

GB = 1e9
REFUSED = "does not fit: the TPU compiler cannot compile"  # how the line for a refused program begins
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    bf16_flops: float  # peak dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s


# Per chip, by the device_kind libtpu gives its devices; Google's published figures.
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1200 GB/s, 275 TFLOP/s bf16
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1200 * GB),
    # cloud.google.com/tpu/docs/v5e: 16 GB HBM2, 819 GB/s, 197 TFLOP/s bf16
    "TPU v5 lite": Chip("v5e", 16 * GB, 197e12, 819 * GB),
    # cloud.google.com/tpu/docs/v5p: 95 GB HBM2e, 2765 GB/s, 459 TFLOP/s bf16
    "TPU v5": Chip("v5p", 95 * GB, 459e12, 2765 * GB),
    # cloud.google.com/tpu/docs/v6e: 32 GB HBM, 1640 GB/s, 918 TFLOP/s bf16
    "TPU v6 lite": Chip("v6e", 32 * GB, 918e12, 1640 * GB),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    mesh: Mesh
    chip: Chip
    chips: int
    hosts: int
    libtpu_flags: str  # LIBTPU_INIT_ARGS: the TPU compiler's settings, which change what compiling costs

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def device_share(self) -> float:
        """The share of a chip one device has (v4's two cores show as two devices)."""
        return self.chips / self.devices


def topology(name: str) -> Topology:
    """The TPU slice `name` ("v5e:2x4", "v4:2x2x1", "v5p:2x2x2", "v6e:4x4"), its devices on one mesh axis."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"--topology {name!r}: {first}; give one like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4") from None
    except (RuntimeError, ValueError) as e:  # no TPU plugin: jax[tpu] is not installed
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"compiling for a TPU needs libtpu ({first}): pip install 'jax[tpu]=={jax.__version__}'"
        ) from None
    devices = desc.devices
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise UserError(f"--topology {name!r}: chip {kind!r} is not in esd_jax.plan.CHIPS; known: {', '.join(CHIPS)}")
    return Topology(
        name=name,
        mesh=Mesh(np.asarray(devices), (AXIS,)),
        chip=CHIPS[kind],
        chips=len({tuple(d.coords) for d in devices}),
        hosts=len({d.process_index for d in devices}),
        libtpu_flags=os.environ.get("LIBTPU_INIT_ARGS", ""),
    )


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One program compiled for the topology: its per-device memory and XLA's cost analysis (a loop's
    body counted once)."""

    name: str
    seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float  # XLA's count as compiled for the chip: padded to its tiles, a Pallas backward left out
    math_flops: float  # 2 x the multiply-adds of its products and convolutions (esd_jax.flops)
    bytes_accessed: float
    hlo: str = dataclasses.field(repr=False)

    @property
    def peak_bytes(self) -> int:
        """Its arguments, temporaries and the outputs it cannot write over donated arguments."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compile_program(name: str, fn, *args, **kwargs) -> Compiled:
    began = time.perf_counter()
    traced = fn.trace(*args, **kwargs)
    # XLA's TPU compiler gives up when a program outgrows one of the chip's memories: HBM, VMEM, or the
    # sync flags of its asynchronous copies and collectives (SDXL's ESD-u FSDP update on a v5e).
    refused = (
        f"{REFUSED} {name}: {{xla}} A run would fail the same way: try another --topology, --config.method or "
        "a smaller --config.resolution"
    )
    with exhausted_as(refused):
        compiled = traced.lower().compile()
    seconds = time.perf_counter() - began
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    return Compiled(
        name=name,
        seconds=seconds,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        flops=cost.get("flops", 0.0),
        math_flops=flops.flops(traced, "tpu"),
        bytes_accessed=cost.get("bytes accessed", 0.0),
        hlo=compiled.as_text(),
    )


def compile_side_by_side(*programs: tuple) -> tuple[list[Compiled], float, float]:
    """(each (name, jitted function, arguments) compiled side by side, as train.erase compiles them; the
    wall time of all; the CPU seconds of all, which other work on the host leaves about the same)."""
    began, cpu = time.perf_counter(), time.process_time()
    compiled = side_by_side(compile_program, [(name, fn, *args) for name, fn, args in programs])
    return compiled, time.perf_counter() - began, time.process_time() - cpu


def host_peak_bytes() -> int:
    """This process's peak resident memory on the host so far: a plan's is its compiles', which an
    SDXL-size program takes to tens of GB (a 24 GiB host runs out on some)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def placed(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or shapes) with `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replicated(tree, mesh: Mesh):
    return placed(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def per_device_bytes(tree) -> int:
    """The bytes each device holds of the placed ShapeDtypeStructs `tree`."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def token_shapes(pipe: StableDiffusion, rows: int, sharding=None) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Token ids of `rows` prompts for each text encoder, at the tokenizer's length, as shapes."""
    return tuple(
        jax.ShapeDtypeStruct((rows, pipe.configs[name]["max_position_embeddings"]), jnp.int32, sharding=sharding)
        for name in pipe.networks
        if name.startswith("text_encoder")
    )


def prompt_shapes(pipe: StableDiffusion, concepts: int, erase_froms: int, retains: int = 0) -> Prompts:
    """The run's prompt conditioning as shapes: the text encoders' output at the tokenizers' length."""
    graphdefs, weights = zip(*(nnx.split(m) for m in pipe.text_encoders), strict=True)
    times = None if pipe.time_ids() is None else jax.ShapeDtypeStruct((6,), jnp.float32)

    def encoded(weights, ids, times):
        encoders = tuple(nnx.merge(g, w) for g, w in zip(graphdefs, weights, strict=True))
        return conditioning.first(conditioning.encode(encoders, ids, times))

    one = jax.eval_shape(encoded, weights, token_shapes(pipe, 1), times)

    def rows(n: int):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), one) if n else None

    return Prompts(concept=rows(concepts), erase_from=rows(erase_froms), null=one, retain=rows(retains))


def robust_shapes(pipe: StableDiffusion, prompts: Prompts, tokens: int):
    """(prompts with robust erasure's inputs, its prefixes, the text encoder's graph) as shapes (robust.py)."""
    if pipe.is_xl:
        raise UserError("config.robust_every: robust erasure is for SD 1.x and 2.x, not SDXL's two text encoders")
    graphdef, weights = nnx.split(pipe.text_encoder)
    n = conditioning.count(prompts.concept)
    ids = jax.ShapeDtypeStruct((n, token_shapes(pipe, 1)[0].shape[1]), jnp.int32)
    adversary = jax.ShapeDtypeStruct((n, tokens, pipe.text_encoder.config.hidden_size), jnp.float32)
    return dataclasses.replace(prompts, adversarial={"encoder": weights, "ids": ids}), adversary, graphdef


def unet_call(graphdef, weights, topo: Topology, batch: int, latent_shape, prompts: Prompts) -> Compiled:
    """One UNet call at `batch` samples per device, the weights placed as the step has them."""
    mesh = topo.mesh
    n = batch * topo.devices
    rows = NamedSharding(mesh, P(AXIS))
    x = jax.ShapeDtypeStruct((n, *latent_shape), jnp.float32, sharding=rows)
    t = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows)
    context = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=rows), prompts.null)

    def local(weights, x, t, context):
        return nnx.merge(graphdef, *weights)(x, t, **context)

    # As the step calls it: each device its own rows (a Pallas kernel runs only inside a shard_map).
    specs = tuple(parallel.local_specs(w) for w in weights)
    call = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(specs, rows.spec, rows.spec, rows.spec), out_specs=P(AXIS), check_vma=False
        )
    )

    return compile_program(f"UNet call, batch {batch}", call, weights, x, t, context)


@dataclasses.dataclass(frozen=True)
class Share:
    """A program's part of one iteration: `program` run `times` per iteration, its loop body `call` run
    `calls` times on average on a device and `slowest_calls` on the device every other waits for."""

    program: Compiled
    times: float = 1.0
    call: Compiled | None = None
    calls: float = 1.0
    slowest_calls: float = 1.0

    def flops(self, calls: float | None = None, kind: str = "flops") -> float:
        """FLOPs per iteration, `kind` "flops" as compiled for the chip or "math_flops"."""
        extra = (self.calls if calls is None else calls) - 1
        program, call = getattr(self.program, kind), getattr(self.call, kind) if self.call else 0.0
        return self.times * (program + extra * call)

    def bytes_accessed(self, calls: float | None = None) -> float:
        extra = (self.calls if calls is None else calls) - 1
        return self.times * (self.program.bytes_accessed + (extra * self.call.bytes_accessed if self.call else 0.0))

    def seconds(self, topo: Topology) -> tuple[float, float]:
        """(at the chip's peak FLOP/s, at its HBM bandwidth), as long as the slowest device takes."""
        share = topo.device_share
        # Either count can fall short of the work: take the larger.
        work = max(self.flops(self.slowest_calls), self.flops(self.slowest_calls, kind="math_flops"))
        compute = work / (topo.chip.bf16_flops * share)
        return compute, self.bytes_accessed(self.slowest_calls) / (topo.chip.hbm_bandwidth * share)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a plan found, per device; `report` shows it and `as_json` keeps it."""

    title: str
    topo: Topology
    memory: dict[str, int]  # the resident arrays of the run, by what they hold
    programs: list[Compiled]  # what the run compiles
    compile_seconds: float  # this host's wall time compiling them, side by side as a run does
    compile_cpu_seconds: float  # the CPU seconds of it, all threads
    calls: list[Compiled]  # compiled by the plan alone, to count the loops
    shares: list[Share]  # of one iteration
    units: int  # iterations (or batches) in the run
    unit: str  # "iteration" or "batch of N images"
    counting: str  # how the UNet calls per iteration were counted
    host_peak_bytes: int  # the plan process's peak resident memory on this host: its compiles'

    @property
    def peak_bytes(self) -> int:
        """The most any program needs while the run's arrays stay resident: XLA counts only the arguments
        a program uses, and the run keeps every one of them on the chip from step to step."""
        resident = sum(self.memory.values())
        return max(max(resident, p.argument_bytes) + p.peak_bytes - p.argument_bytes for p in self.programs)

    @property
    def capacity_bytes(self) -> float:
        return self.topo.chip.hbm_bytes * self.topo.device_share

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    @property
    def flops(self) -> float:
        return sum(s.flops() for s in self.shares)

    @property
    def math_flops(self) -> float:
        return sum(s.flops(kind="math_flops") for s in self.shares)

    @property
    def bytes_accessed(self) -> float:
        return sum(s.bytes_accessed() for s in self.shares)

    @property
    def seconds(self) -> tuple[float, float, float]:
        """(compute-bound, memory-bound, the bound: each program's larger of the two, summed) per unit."""
        both = [s.seconds(self.topo) for s in self.shares]
        return sum(c for c, _ in both), sum(m for _, m in both), sum(max(c, m) for c, m in both)

    def as_json(self) -> dict:
        compute, memory, bound = self.seconds
        return {
            "title": self.title,
            "topology": self.topo.name,
            "chip": self.topo.chip.name,
            "chips": self.topo.chips,
            "devices": self.topo.devices,
            "hosts": self.topo.hosts,
            "memory_bytes": self.memory,
            "programs": [
                {
                    "name": p.name,
                    "compile_seconds": p.seconds,
                    "argument_bytes": p.argument_bytes,
                    "output_bytes": p.output_bytes,
                    "alias_bytes": p.alias_bytes,
                    "temp_bytes": p.temp_bytes,
                    "peak_bytes": p.peak_bytes,
                    "flops": p.flops,
                    "math_flops": p.math_flops,
                    "bytes_accessed": p.bytes_accessed,
                }
                for p in self.programs
            ],
            "unet_calls": [
                {"name": c.name, "flops": c.flops, "math_flops": c.math_flops, "bytes_accessed": c.bytes_accessed}
                for c in self.calls
            ],
            "peak_bytes": self.peak_bytes,
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
            "unit": self.unit,
            "flops_per_unit": self.flops,
            "math_flops_per_unit": self.math_flops,
            "bytes_per_unit": self.bytes_accessed,
            "compute_seconds_per_unit": compute,
            "memory_seconds_per_unit": memory,
            "bound_seconds_per_unit": bound,
            "units": self.units,
            "run_seconds": bound * self.units,
            "compile_seconds": self.compile_seconds,
            "compile_cpu_seconds": self.compile_cpu_seconds,
            "host_peak_bytes": self.host_peak_bytes,
            "libtpu_flags": self.topo.libtpu_flags,
            "counting": self.counting,
        }


def plan_erase(cfg: EraseConfig, topology_name: str) -> Plan:
    """The erase run `cfg` compiled for `topology_name`, from shapes alone."""
    topo = topology(topology_name)
    mesh, devices = topo.mesh, topo.devices
    pipe = abstract_pipeline(cfg.model, cfg.dtype)
    shape = pipe.latent_shape(cfg.resolution)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    graphdef, trainable, original, frozen = split_for_erase(
        pipe.unet, cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.seed
    )
    optimizer = optax.adam(cfg.learning_rate)
    prompts = prompt_shapes(pipe, len(cfg.concepts), len(cfg.erase_froms), len(cfg.retains))
    adversary, text_graphdef = None, None
    if cfg.robust_every:
        prompts, adversary, text_graphdef = robust_shapes(pipe, prompts, cfg.robust_tokens)
    state = jax.eval_shape(lambda t: initial_state(t, optimizer, cfg.seed, adversary), trainable)
    inputs, shardings = step_inputs(
        mesh, state, frozen, original, prompts, shard_params=cfg.shard_params, frozen_dtype=cfg.frozen_dtype
    )
    state, frozen, original, prompts = placed(inputs, shardings)
    objective, step_fn = make_erase_step(cfg, graphdef, schedule, shape, optimizer, mesh, text_graphdef)
    # A LoRA run's originals are the adapted weights themselves, split off the frozen UNet: not a copy.
    trained, originals = (
        (f"LoRA adapters (rank {cfg.lora_rank}, {cfg.method})", "frozen weights the adapters adapt")
        if cfg.lora_rank
        else (f"trained weights ({cfg.method})", "their originals")
    )
    memory = {
        trained: per_device_bytes(state.trainable),
        originals: per_device_bytes(original),
        "frozen weights": per_device_bytes(frozen),
        "optimizer state (Adam)": per_device_bytes(state.opt_state),
        "prompt embeddings": per_device_bytes(dataclasses.replace(prompts, adversarial=None)),
    }
    if cfg.robust_every:
        memory["robust erasure: text encoder, prefixes"] = per_device_bytes((prompts.adversarial, state.adversary))
    n, b = cfg.ddim_steps, cfg.batch_per_device * cfg.rows_per_erase_pair
    if not cfg.trajectories:
        (pairs_fn, pairs_args), (update_fn, update_args) = step_fn.programs(state, frozen, original, prompts)
        (pairs, update), seconds, cpu = compile_side_by_side(
            ("erase step: training pairs (partial sampling)", pairs_fn, pairs_args),
            ("erase step: update (forward, backward, Adam)", update_fn, update_args),
        )
        call = unet_call(graphdef, (original, frozen), topo, 2 * b, shape, prompts)
        local, slowest = expected_loop_calls(objective, b), expected_loop_calls(objective, b * devices)
        shares = [Share(pairs, 1.0, call, local, slowest), Share(update)]
        target = " + 1 for the target" if shares_the_loop(objective) else ""
        counting = (
            f"sampling loop's UNet calls per iteration: the largest of the device's {b} k (uniform in 0..{n - 1})"
            f"{target}, {local:.2f} on average; {slowest:.2f} on the slowest of {devices} devices, which sets the time"
        )
        programs = [pairs, update]
    else:
        sampler = make_trajectory_sampler(graphdef, schedule, objective, mesh, cfg.trajectories)
        index = replicated(jax.ShapeDtypeStruct((), jnp.int32), mesh)
        cache = jax.eval_shape(sampler, original, frozen, prompts, state.rng, index)
        cache = placed(cache, jax.tree.map(lambda _: NamedSharding(mesh, P(AXIS)), cache))
        memory["trajectory cache"] = per_device_bytes(cache)
        (pairs_fn, pairs_args), (update_fn, update_args) = step_fn.programs(state, frozen, original, prompts, cache)
        (sample, pairs, update), seconds, cpu = compile_side_by_side(
            ("trajectory sampler", sampler, (original, frozen, prompts, state.rng, index)),
            ("erase step: training pairs (drawn from the cache)", pairs_fn, pairs_args),
            ("erase step: update (forward, backward, Adam)", update_fn, update_args),
        )
        contexts = 3 if cfg.erase_from else 2
        per_device = padded_count(cfg.trajectories, devices) // devices * cfg.rows_per_erase_pair
        call = unet_call(graphdef, (original, frozen), topo, contexts * per_device, shape, prompts)
        caches = caches_in(cfg.iterations, cfg.refresh_every)
        shares = [Share(pairs), Share(update), Share(sample, caches / cfg.iterations, call, n, n)]
        counting = (
            f"the sampler's {n} steps of {per_device} trajectories per device, {caches} cache(s) over "
            f"{cfg.iterations} iterations, shared out over them"
        )
        programs = [sample, pairs, update]
    fast = f", fast mode ({cfg.trajectories} trajectories)" if cfg.trajectories else ""
    retained = f" and as many retain pairs ({len(cfg.retains)} prompts)" if cfg.retains else ""
    title = (
        f"erase {cfg.method} on {cfg.model}, {shape[1] * pipe.vae_factor} px, batch {cfg.batch_per_device}"
        f"{retained} per device x {devices}, "
        f"{cfg.dtype} compute, {cfg.frozen_dtype} frozen weights, "
        f"{'shard_params (FSDP)' if cfg.shard_params else 'replicated'}{fast}"
    )
    host = host_peak_bytes()
    return Plan(
        title, topo, memory, programs, seconds, cpu, [call], shares, cfg.iterations, "iteration", counting, host
    )


def plan_sample(
    model: str,
    topology_name: str,
    *,
    batch_size: int,
    resolution: int,
    steps: int,
    guidance: float,
    scheduler: str,
    dtype: str,
) -> Plan:
    """One batch of `esd-jax sample` compiled for `topology_name`: the batch rounded up to the devices."""
    from esd_jax.sampling.sampler import SamplerSettings, generate_batch

    topo = topology(topology_name)
    mesh, devices = topo.mesh, topo.devices
    pipe = abstract_pipeline(model, dtype)
    shape = pipe.latent_shape(resolution)
    batch = -(-batch_size // devices) * devices
    settings = SamplerSettings(
        steps=steps,
        guidance=float(guidance),
        scheduler=scheduler,
        scheduler_config=json.dumps(pipe.scheduler_config, sort_keys=True),
        latent_shape=shape,
        zero_null=pipe.zero_null,
    )
    modules = (pipe.unet, pipe.vae, *pipe.text_encoders)
    graphdefs = tuple(nnx.graphdef(m) for m in modules)
    states = replicated(tuple(nnx.state(m) for m in modules), mesh)
    rows = NamedSharding(mesh, P(AXIS))
    ids = token_shapes(pipe, batch, rows)
    null_ids = replicated(tuple(jax.ShapeDtypeStruct(i.shape[1:], i.dtype) for i in ids), mesh)
    times = None if pipe.time_ids() is None else replicated(jax.ShapeDtypeStruct((6,), jnp.float32), mesh)
    latents = jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=rows)
    statics = dict(graphdefs=graphdefs, settings=settings, mesh=mesh)
    cpu = time.process_time()
    program = compile_program("sampler", generate_batch, states, ids, null_ids, times, latents, **statics)
    cpu = time.process_time() - cpu
    memory = {
        "UNet weights": per_device_bytes(states[0]),
        "text encoder weights": per_device_bytes(states[2:]),
        "VAE weights": per_device_bytes(states[1]),
    }
    local = batch // devices
    per_call = 2 * local if guidance > 1 else local
    prompts = prompt_shapes(pipe, 1, 0)
    call = unet_call(graphdefs[0], (states[0],), topo, per_call, shape, prompts)
    share = Share(program, 1.0, call, steps, steps)
    title = (
        f"sample {model}, {shape[1] * pipe.vae_factor} px, {scheduler} {steps} steps, guidance {guidance:g}, "
        f"{batch} images per batch over {devices} devices, {dtype}"
    )
    counting = f"the denoising loop's {steps} UNet calls of {per_call} rows per device"
    unit, host = f"batch of {batch} images", host_peak_bytes()
    return Plan(title, topo, memory, [program], program.seconds, cpu, [call], [share], 1, unit, counting, host)


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(plan: Plan) -> str:
    """The plan as a table a person reads."""
    topo, chip = plan.topo, plan.topo.chip
    per = "chip" if topo.device_share == 1 else f"device ({topo.device_share:g} chip)"
    lines = [
        plan.title,
        f"topology {topo.name}: {topo.chips} {chip.name} chips ({chip.hbm_bytes / GiB:.1f} GiB HBM, "
        f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / GB:.0f} GB/s each), "
        f"{topo.devices} devices, {topo.hosts} host{'s' if topo.hosts > 1 else ''}",
        "",
        f"memory per {per}",
    ]
    for name, n in plan.memory.items():
        lines.append(f"  {name:44s}{size(n):>12s}")
    for p in plan.programs:
        lines += [
            f"  {p.name}, as XLA lays it out:",
            f"    {'arguments':42s}{size(p.argument_bytes):>12s}",
            f"    {'temporaries':42s}{size(p.temp_bytes):>12s}",
            f"    {'outputs not written in place':42s}{size(p.output_bytes - p.alias_bytes):>12s}",
        ]
    lines.append(
        f"  {'peak, of the ' + size(plan.capacity_bytes) + ' there':44s}{size(plan.peak_bytes):>12s}"
        f"  ({plan.peak_bytes / plan.capacity_bytes:.0%})"
    )
    compute, memory, bound = plan.seconds
    lines += [
        "",
        f"per {plan.unit}, per {per}",
        *(
            f"  {c.name}: {c.math_flops / 1e12:.4g} TFLOP ({c.flops / 1e12:.4g} as compiled for the chip), "
            f"{c.bytes_accessed / GB:.3g} GB accessed"
            for c in plan.calls
        ),
        f"  {plan.counting}",
        f"  {'TFLOP':44s}{plan.math_flops / 1e12:12.4g}",
        f"  {'TFLOP as compiled for the chip':44s}{plan.flops / 1e12:12.4g}",
        f"  {'HBM GB accessed':44s}{plan.bytes_accessed / GB:12.4g}",
        f"  {'seconds at peak FLOP/s':44s}{compute:12.4g}",
        f"  {'seconds at HBM bandwidth':44s}{memory:12.4g}",
        f"  {'seconds, the larger of the two per program':44s}{bound:12.4g}",
    ]
    if plan.units > 1:
        lines.append(f"the run: {plan.units} {plan.unit}s, at least {duration(bound * plan.units)}")
    for p in plan.programs:
        kernels = p.hlo.count('custom_call_target="tpu_custom_call"')
        lines.append(f"{p.name}: {kernels} Pallas (Mosaic) kernel calls" if kernels else f"{p.name}: no Pallas kernel")
    each = ", ".join(f"{p.name} {p.seconds:.0f} s" for p in plan.programs)
    if len(plan.programs) > 1:
        each = f"{plan.compile_seconds:.0f} s, side by side as a run compiles them ({each})"
    lines.append(
        f"compile on this host: {each}; {plan.compile_cpu_seconds:.0f} CPU seconds, "
        f"{size(plan.host_peak_bytes)} of its memory at the peak"
    )
    if topo.libtpu_flags:
        lines.append(f"  with LIBTPU_INIT_ARGS={topo.libtpu_flags}")
    return "\n".join(lines)


def misfit(plan: Plan, changes: list[str]) -> str:
    """The one line for a run that does not fit, and the settings that would shrink it."""
    chip = plan.topo.chip.name
    over = plan.peak_bytes - plan.capacity_bytes
    return (
        f"does not fit: {size(plan.peak_bytes)} per device of the {size(plan.capacity_bytes)} a {chip} device "
        f"has ({size(over)} over); try {', '.join(changes)}"
    )


def erase_changes(cfg: EraseConfig, topo: Topology) -> list[str]:
    """The settings that lower an erase's memory, from the one that costs least."""
    changes = []
    if cfg.frozen_dtype == "float32":
        changes.append("--config.frozen_dtype=bfloat16")
    if cfg.dtype == "float32":
        changes.append("--config.dtype=bfloat16")
    if not cfg.shard_params and topo.devices > 1:
        changes.append("--config.shard_params=True")
    if cfg.batch_per_device > 1:
        changes.append("a smaller --config.batch_per_device")
    changes.append("a smaller --config.resolution")
    return changes


def write_json(plan: Plan, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(plan.as_json(), indent=2) + "\n")
