"""The ESD objective and its one compiled, data-parallel training step.

Gandikota et al., "Erasing Concepts from Diffusion Models" (ICCV 2023). For each sample: partially
sample x_t with classifier-free-guided DDIM under the concept, then train the model so that,
conditioned on the concept, it predicts the frozen model's noise pushed away from the concept:
    target = e_base - eta * (e_c - e_0),  e_base = e_0 (paper) or e_f (erase-from, official code).
With retain prompts r, every step also trains as many retain pairs, sampled under r, towards the frozen
model's own prediction e_r there, weighted by lambda: loss = mean(ESD) + lambda mean((e_theta(x_r, r) - e_r)^2).
The trained model e_theta runs the trained weights, or for a LoRA run the frozen ones with the adapters merged
in (trained_unet); the frozen model runs the originals.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esd_jax import conditioning, lora, parallel
from esd_jax.conditioning import concat, repeat, take
from esd_jax.parallel import AXIS
from esd_jax.robust import Robust, adversarial_cond, attacked
from esd_jax.schedulers import NoiseSchedule, ddim_step


@dataclasses.dataclass(frozen=True)
class Objective:
    negative_guidance: float  # eta
    start_guidance: float  # CFG scale of the partial sampling
    ddim_steps: int
    xt_model: str  # "frozen" (official diffusers code) or "trainable" (paper, CompVis code)
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent
    erase_from: bool  # whether erase-from prompts are given


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The prompts' UNet conditioning (esd_jax.conditioning), encoded once: the concepts, their erase-from
    prompts (or None), "" and the retain prompts (or None). A training row names its prompt by an index
    into the concepts followed by the retain prompts (row_prompts)."""

    concept: Any  # [n, ...]
    erase_from: Any | None  # [n, ...]
    null: Any  # one prompt's, no row axis
    retain: Any | None = None  # [m, ...]
    # Robust erasure's text encoder and the trained prompts' ids with slots for the prefix (robust.py), or None.
    adversarial: Any | None = None


jax.tree_util.register_dataclass(
    Prompts, data_fields=["concept", "erase_from", "null", "retain", "adversarial"], meta_fields=[]
)


def row_prompts(prompts: Prompts, index: jax.Array) -> tuple[Any, Any, jax.Array | None]:
    """(c [B, ...], f [B, ...], retained [B] bool or None without retain prompts) of rows whose prompts
    `index` names among the concepts followed by the retain prompts: c the row's concept, f the prompt the
    frozen model samples under (its erase-from prompt, else its concept; a retain prompt is its own)."""
    f = prompts.concept if prompts.erase_from is None else prompts.erase_from
    if prompts.retain is None:
        return take(prompts.concept, index), take(f, index), None
    c_table, f_table = (concat([table, prompts.retain]) for table in (prompts.concept, f))
    return take(c_table, index), take(f_table, index), index >= conditioning.count(prompts.concept)


@dataclasses.dataclass
class TrainState:
    """Everything that changes during a run; a pytree of arrays, checkpointed as a whole."""

    step: jax.Array
    trainable: Any  # nnx.State of the trained parameters
    opt_state: Any
    rng: jax.Array
    adversary: jax.Array | None = None  # robust erasure's prefixes [n, k, D] (robust.py), or None


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "trainable", "opt_state", "rng", "adversary"], meta_fields=[]
)


def initial_state(trainable, optimizer: optax.GradientTransformation, seed: int, adversary=None) -> TrainState:
    return TrainState(
        step=jnp.int32(0),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
        adversary=adversary,
    )


def stored_as(x, dtype: str):
    """An array, or a shape, in `dtype`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype))
    return x.astype(dtype)


def shards_trained(shard_params: bool, trainable) -> bool:
    """Whether the trained weights are sharded over the mesh: with `shard_params`, unless they are a LoRA
    run's adapters, which are small enough to keep whole on every device."""
    return shard_params and not isinstance(trainable, lora.Adapters)


def step_inputs(
    mesh: Mesh, state: TrainState, frozen, original, prompts: Prompts, *, shard_params: bool, frozen_dtype: str
):
    """((state, frozen, original, prompts), their shardings): the step's inputs (arrays or shapes) as it
    wants them. Without `shard_params` every array is replicated. With it (FSDP) the frozen weights, the
    originals, the trained weights (shards_trained) and the optimizer state are sharded over the mesh,
    and the step gathers each weight layer by layer where it uses it (parallel.gathered_where_used). The
    frozen weights and the originals are stored in `frozen_dtype`; the trained weights and Adam's
    moments stay float32."""
    if frozen_dtype != "float32":
        frozen, original = (jax.tree.map(lambda x: stored_as(x, frozen_dtype), t) for t in (frozen, original))
    if shard_params:
        frozen, original = (parallel.gathered_where_used(t, mesh.devices.size) for t in (frozen, original))

    def sharded(tree):
        return parallel.shardings(tree, mesh, shard=shard_params)

    placed = TrainState(
        step=parallel.shardings(state.step, mesh),
        trainable=parallel.shardings(state.trainable, mesh, shard=shards_trained(shard_params, state.trainable)),
        opt_state=sharded(state.opt_state),
        rng=parallel.shardings(state.rng, mesh),
        adversary=parallel.shardings(state.adversary, mesh),
    )
    return (state, frozen, original, prompts), (
        placed,
        sharded(frozen),
        sharded(original),
        parallel.shardings(prompts, mesh),
    )


def all_finite(tree) -> jax.Array:
    """True where every floating-point number of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# Folded into the run's key for the fast mode's randomness (esd_jax.trajectories) and the retain pairs'; a
# step never reaches them.
TRAJECTORY_STREAM = 2**31 - 1
PAIR_STREAM = 2**31 - 2
RETAIN_STREAM = 2**31 - 3


def retain_key(rng: jax.Array) -> jax.Array:
    """The key the retain pairs are drawn with, as the erase pairs are with `rng`: adding retain prompts
    leaves the erase pairs as they were."""
    return jax.random.fold_in(rng, RETAIN_STREAM)


def interleaved(erase: jax.Array, retain: jax.Array, devices: int) -> jax.Array:
    """Rows [G] and [G] as [2G] whose every device's block (sharded over the batch) holds its share of the
    erase rows and then as many retain rows."""
    blocks = [x.reshape(devices, -1, *x.shape[1:]) for x in (erase, retain)]
    return jnp.concatenate(blocks, axis=1).reshape(-1, *erase.shape[1:])


def sample_draws(rng: jax.Array, step: jax.Array, global_batch: int, ddim_steps: int, num_prompts: int):
    """Per-sample randomness from (seed, step, sample index): independent of how many devices run it."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, step), i))(jnp.arange(global_batch))
    k = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, 0), (), 0, ddim_steps))(keys)
    prompt = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, 1), (), 0, num_prompts))(keys)
    noise_keys = jax.vmap(lambda key: jax.random.fold_in(key, 2))(keys)
    return k, prompt, noise_keys


def cache_of(step, refresh_every: int):
    """(the fast mode's cache, the step within it) of training step `step` (counted from 0): with
    `refresh_every` a fresh cache every that many steps, else one for the run."""
    return (step // refresh_every, step % refresh_every) if refresh_every else (0, step)


def caches_in(iterations: int, refresh_every: int) -> int:
    """How many caches a run of `iterations` steps samples."""
    return cache_of(iterations - 1, refresh_every)[0] + 1


def pair_draws(rng: jax.Array, step: jax.Array, count: int, ddim_steps: int, global_batch: int, refresh_every: int = 0):
    """(trajectory [B], step k [B]) of the batch at training step `step` from the cache in use then
    (cache_of): every epoch of count * ddim_steps // B steps within one cache draws distinct pairs, in
    an order from (seed, cache, epoch)."""
    pairs = count * ddim_steps
    per_epoch = pairs // global_batch
    cache, local = cache_of(step, refresh_every)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, PAIR_STREAM), cache), local // per_epoch)
    order = jax.random.permutation(key, pairs)
    chosen = jax.lax.dynamic_slice(order, ((local % per_epoch) * global_batch,), (global_batch,))
    return chosen // ddim_steps, chosen % ddim_steps


def guided(objective: Objective, e_null: jax.Array, e_cond: jax.Array) -> jax.Array:
    """The classifier-free-guided prediction that partial sampling steps with."""
    return e_null + objective.start_guidance * (e_cond - e_null)


def negatively_guided(objective: Objective, e_0: jax.Array, e_c: jax.Array, e_base: jax.Array) -> jax.Array:
    """The ESD target e_base - eta (e_c - e_0)."""
    return e_base - objective.negative_guidance * (e_c - e_0)


def targets(objective: Objective, e_0, e_c, e_base, retained: jax.Array | None) -> jax.Array:
    """The ESD target on erase rows; on `retained` rows ([B] bool; None: none) e_c, the frozen model's
    prediction under the row's own (retain) prompt."""
    target = negatively_guided(objective, e_0, e_c, e_base)
    return target if retained is None else jnp.where(retained[:, None, None, None], e_c, target)


def partial_sample(
    unet,
    schedule: NoiseSchedule,
    objective: Objective,
    noise: jax.Array,
    k: jax.Array,
    cond,
    null,
    *,
    predictions: bool = False,
):
    """x_t after k_b guided DDIM steps from noise, per sample b (k_b = 0: the noise itself); with
    `predictions`, (x_t, e_null, e_cond): also the guided step's two predictions at x_t (float32), from
    one more turn of the same loop rather than a UNet call of their own, which XLA would compile again.

    The loop runs to the largest k of the local batch (one further with `predictions`); samples already
    at their k stay put.
    """
    timesteps = jnp.asarray(schedule.timesteps(objective.ddim_steps))
    prev = jnp.asarray(schedule.prev_timesteps(objective.ddim_steps))
    b = noise.shape[0]
    context = concat([repeat(null, cond), cond])  # [2B, ...]: uncond, cond

    def body(carry):
        i, x, at_x_t = carry
        t = jnp.full((2 * b,), timesteps[i])
        e_null, e_cond = jnp.split(unet(jnp.concatenate([x, x]), t, **context), 2)
        x_next = ddim_step(schedule, guided(objective, e_null, e_cond), timesteps[i], prev[i], x)
        here = (i == k)[:, None, None, None]
        e_null, e_cond = (e.astype(jnp.float32) for e in (e_null, e_cond))
        at_x_t = (jnp.where(here, e_null, at_x_t[0]), jnp.where(here, e_cond, at_x_t[1]))
        return i + 1, jnp.where((i < k)[:, None, None, None], x_next, x), at_x_t

    zeros = jnp.zeros(noise.shape, jnp.float32)
    turns = k.max() + 1 if predictions else k.max()
    _, x, (e_null, e_cond) = jax.lax.while_loop(lambda c: c[0] < turns, body, (jnp.int32(0), noise, (zeros, zeros)))
    return (x, e_null, e_cond) if predictions else x


def shares_the_loop(objective: Objective) -> bool:
    """Whether the target's frozen predictions come from the sampling loop's last turn: when the frozen model
    samples under the concept itself, e_0 and e_c at x_t are that turn's two halves."""
    return objective.xt_model == "frozen" and not objective.erase_from


def expected_loop_calls(objective: Objective, batch: int) -> float:
    """The UNet calls partial_sample's loop makes on average for `batch` samples in one iteration."""
    return expected_sampling_steps(objective.ddim_steps, batch) + shares_the_loop(objective)


def expected_sampling_steps(ddim_steps: int, batch: int) -> float:
    """The guided steps partial_sample's loop runs on average for `batch` samples: the largest of their k,
    each uniform in 0..ddim_steps - 1, so E = sum over m = 1..N-1 of P(max >= m) = 1 - (m / N) ** batch."""
    return sum(1 - (m / ddim_steps) ** batch for m in range(1, ddim_steps))


def esd_target(
    frozen_unet,
    objective: Objective,
    x_t: jax.Array,
    t: jax.Array,
    c,
    f,
    null,
    retained: jax.Array | None = None,
) -> jax.Array:
    """e_base - eta (e_c - e_0) from the frozen model (targets), its predictions batched into one UNet call."""
    contexts = [repeat(null, c), c] + ([f] if objective.erase_from else [])
    n = len(contexts)
    preds = frozen_unet(jnp.concatenate([x_t] * n), jnp.concatenate([t] * n), **concat(contexts))
    e_0, e_c, *rest = jnp.split(preds.astype(jnp.float32), n)
    e_base = rest[0] if objective.erase_from else e_0
    return jax.lax.stop_gradient(targets(objective, e_0, e_c, e_base, retained))


def trained_weights(trainable, original):
    """The trained layers' weights the trained model runs with: the `trainable` ones themselves, or for a
    LoRA run (trainable: lora.Adapters) the frozen `original` ones with the adapters merged in."""
    return lora.merged(original, trainable) if isinstance(trainable, lora.Adapters) else trainable


def trained_unet(graphdef, trainable, original, frozen):
    """The model being trained, with the `trainable` parameters (trained_weights)."""
    return nnx.merge(graphdef, trained_weights(trainable, original), frozen)


def squared_errors(trainable, original, frozen, graphdef, x_t: jax.Array, t: jax.Array, cond, target: jax.Array):
    """(e_theta(x_t, t, cond) - target)^2 for the model with the `trainable` parameters."""
    e_theta = trained_unet(graphdef, trainable, original, frozen)(x_t, t, **cond)
    return jnp.square(e_theta.astype(jnp.float32) - target)


def esd_loss(trainable, original, frozen, graphdef, x_t: jax.Array, t: jax.Array, cond, target: jax.Array):
    """mean((e_theta(x_t, t, cond) - target)^2) for the model with the `trainable` parameters."""
    return jnp.mean(squared_errors(trainable, original, frozen, graphdef, x_t, t, cond, target))


def step_loss(
    trainable, original, frozen, graphdef, x_t, t, cond, target, retain_weight: float, retains: bool, adversarial=None
):
    """(the loss of one device's rows, its parts): the ESD loss of the erase rows, with retain prompts
    (`retains`: each device's erase rows, then as many retain rows: interleaved) + retain_weight x the
    retain rows' loss, and with `adversarial` conditioning (robust.py) of the first erase rows + their ESD
    loss under it, all in one UNet call."""
    erase = x_t.shape[0] // 2 if retains else x_t.shape[0]
    if adversarial is not None:
        extra = conditioning.count(adversarial)
        x_t, t, target = (jnp.concatenate([a, a[:extra]]) for a in (x_t, t, target))
        cond = concat([cond, adversarial])
    squared = jnp.mean(squared_errors(trainable, original, frozen, graphdef, x_t, t, cond, target), axis=(1, 2, 3))
    losses = {"loss": jnp.mean(squared[:erase])}
    total = losses["loss"]
    if retains:
        losses["retain_loss"] = jnp.mean(squared[erase : 2 * erase])
        total = total + retain_weight * losses["retain_loss"]
    if adversarial is not None:
        losses["adversarial_loss"] = jnp.mean(squared[x_t.shape[0] - extra :])
        total = total + losses["adversarial_loss"]
    return total, losses


@dataclasses.dataclass
class Pairs:
    """One step's training pairs, on the devices: x_t, the target there, their prompts and their k."""

    x_t: jax.Array  # [B, C, H, W]
    target: jax.Array  # [B, C, H, W] float32
    prompt: jax.Array  # [B] int32: the rows' prompts (row_prompts)
    k: jax.Array  # [B] int32: the DDIM step of x_t
    adversary: jax.Array | None = None  # robust erasure's prefixes to train against (replicated), or None
    attack_loss: jax.Array | None = None  # the inner attack's last loss where this step ran one, else NaN


jax.tree_util.register_dataclass(
    Pairs, data_fields=["x_t", "target", "prompt", "k", "adversary", "attack_loss"], meta_fields=[]
)


def local_pairs(
    trainable,
    frozen,
    original,
    graphdef,
    schedule: NoiseSchedule,
    objective: Objective,
    prompts: Prompts,
    k: jax.Array,
    prompt: jax.Array,
    noise_keys: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(x_t, target) of one device's samples, their prompts named by `prompt` (row_prompts): x_t by partial
    sampling, the target from the frozen model."""
    c, f, retained = row_prompts(prompts, prompt)
    noise = jax.vmap(lambda key: jax.random.normal(key, objective.latent_shape))(noise_keys)  # [B, C, H, W]
    if shares_the_loop(objective):
        sampler = nnx.merge(graphdef, original, frozen)
        x_t, e_0, e_c = partial_sample(sampler, schedule, objective, noise, k, f, prompts.null, predictions=True)
        return x_t, targets(objective, e_0, e_c, e_0, retained)
    if objective.xt_model == "frozen":
        sampler = original
    else:
        sampler = jax.lax.stop_gradient(trained_weights(trainable, original))
    x_t = partial_sample(nnx.merge(graphdef, sampler, frozen), schedule, objective, noise, k, f, prompts.null)
    t = jnp.asarray(schedule.timesteps(objective.ddim_steps))[k]
    return x_t, esd_target(nnx.merge(graphdef, original, frozen), objective, x_t, t, c, f, prompts.null, retained)


def make_erase_step(cfg, graphdef, schedule: NoiseSchedule, latent_shape, optimizer, mesh: Mesh, text_graphdef=None):
    """(the objective, the compiled step) of the erase run `cfg` (an esd_jax.config.EraseConfig); robust
    erasure reads its prefixes with the text encoder of graph `text_graphdef`."""
    objective = Objective(
        negative_guidance=cfg.negative_guidance,
        start_guidance=cfg.start_guidance,
        ddim_steps=cfg.ddim_steps,
        xt_model=cfg.xt_model,
        latent_shape=latent_shape,
        erase_from=bool(cfg.erase_from),
    )
    step = make_train_step(
        graphdef,
        schedule,
        objective,
        optimizer,
        mesh,
        cfg.batch_per_device,
        trajectories=cfg.trajectories,
        refresh_every=cfg.refresh_every,
        retain_weight=cfg.retain_weight,
        robust=Robust(cfg.robust_every, cfg.robust_steps, cfg.robust_lr, cfg.robust_tokens)
        if cfg.robust_every
        else None,
        text_graphdef=text_graphdef,
        shard_params=cfg.shard_params,
    )
    return objective, step


class TrainStep:
    """The erase step, (state, frozen, original, prompts[, cache]) -> (state, metrics), as two compiled
    programs that the devices run back to back with no host round trip: `pairs` makes the step's training
    pairs (the recipe's partial sampling, or a draw from the fast mode's cache) and `update` trains on
    them (the trained model's forward and backward, the gradient's average, Adam). Two, not one, because
    XLA compiles two programs side by side (`programs`) in much less time than their union alone."""

    def __init__(self, pairs, update):
        self.pairs, self.update = pairs, update

    def __call__(self, state: TrainState, frozen, original, prompts: Prompts, cache=None):
        return self.update(state, frozen, original, prompts, self.pairs(state, frozen, original, prompts, cache))

    def programs(self, state: TrainState, frozen, original, prompts: Prompts, cache=None) -> list[tuple]:
        """(jitted function, its arguments) of each program, for arrays or shapes."""
        pairs = jax.eval_shape(self.pairs, state, frozen, original, prompts, cache)
        return [
            (self.pairs, (state, frozen, original, prompts, cache)),
            (self.update, (state, frozen, original, prompts, pairs)),
        ]


def make_train_step(
    graphdef,
    schedule: NoiseSchedule,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    batch_per_device: int,
    trajectories: int = 0,
    refresh_every: int = 0,
    retain_weight: float = 1.0,
    robust: Robust | None = None,
    text_graphdef=None,
    shard_params: bool = False,
) -> TrainStep:
    """The step of an erase run over `mesh` (TrainStep).

    Inside shard_maps every device samples and differentiates its own share of the batch (so its sampling
    loop runs only as long as its own k needs); gradients are averaged over the mesh, and the optax update
    runs on the (replicated or sharded) optimizer state outside them. With `trajectories` > 0 the pairs
    come from the fast mode's cache (esd_jax.trajectories) instead. With retain prompts, each device's
    rows are its erase pairs followed by as many retain pairs (interleaved), drawn as the erase pairs are
    but from retain_key, and the loss adds `retain_weight` x theirs. With `robust` (esd_jax.robust; the
    text encoder's graph `text_graphdef`), every robust.every steps `pairs` runs an inner attack against
    the trained model for new prefixes, and `update` trains the erase rows under them as well. With
    `shard_params` the trained weights come sharded (step_inputs), and the shard_maps gather each where
    it is used, as they do the frozen ones.
    """
    devices = mesh.devices.size
    global_batch = batch_per_device * devices
    timesteps = jnp.asarray(schedule.timesteps(objective.ddim_steps))

    def local_sampled(trainable, frozen, original, prompts, k, prompt, noise_keys):
        return local_pairs(trainable, frozen, original, graphdef, schedule, objective, prompts, k, prompt, noise_keys)

    def erase_rows(b: int, retains: bool) -> int:
        """How many of a device's b rows, the first, are erase rows (interleaved)."""
        return b // 2 if retains else b

    def marked(trainable):
        """The trained weights as the shard_maps take them: sharded ones marked to be gathered where used."""
        sharded = shards_trained(shard_params, trainable)
        return parallel.gathered_where_used(trainable, devices) if sharded else trainable

    def local_trained(trainable, original, frozen, prompts, x_t, t, prompt, target, adversary):
        cond = row_prompts(prompts, prompt)[1]
        retains = prompts.retain is not None
        adversarial = None
        if robust is not None:
            erase = erase_rows(x_t.shape[0], retains)
            adversarial = adversarial_cond(text_graphdef, prompts.adversarial, adversary, prompt[:erase])
        (_, losses), grads = jax.value_and_grad(step_loss, has_aux=True)(
            trainable, original, frozen, graphdef, x_t, t, cond, target, retain_weight, retains, adversarial
        )
        return jax.lax.pmean(losses, AXIS), parallel.mean_gradients(grads, devices)

    def local_attacked(trainable, frozen, original, prompts, adversary, x_t, t, prompt):
        erase = erase_rows(x_t.shape[0], prompts.retain is not None)
        c = row_prompts(prompts, prompt)[0]
        model = trained_unet(graphdef, jax.lax.stop_gradient(trainable), original, frozen)
        frozen_model = nnx.merge(graphdef, original, frozen)
        rows = (x_t[:erase], t[:erase], take(c, jnp.arange(erase)), prompt[:erase])
        return attacked(model, frozen_model, text_graphdef, robust, prompts.adversarial, adversary, *rows)

    def with_adversary(state: TrainState, frozen, original, prompts: Prompts, pairs: Pairs) -> Pairs:
        """`pairs` with the prefixes to train against: new ones from an inner attack every robust.every
        steps (counted from 0), else the state's."""
        trainable = marked(state.trainable)
        weights = parallel.local_specs(trainable), parallel.local_specs(frozen), parallel.local_specs(original)
        attack = jax.shard_map(
            local_attacked,
            mesh=mesh,
            in_specs=(*weights, P(), P(), batch, batch, batch),
            out_specs=(P(), P()),
            check_vma=False,
        )
        adversary, loss = jax.lax.cond(
            state.step % robust.every == 0,
            lambda: attack(trainable, frozen, original, prompts, state.adversary, *rows_of(pairs)),
            lambda: (state.adversary, jnp.float32(jnp.nan)),
        )
        return dataclasses.replace(pairs, adversary=adversary, attack_loss=loss)

    def rows_of(pairs: Pairs) -> tuple:
        return pairs.x_t, timesteps[pairs.k], pairs.prompt

    def with_retained(erase: tuple, retain) -> tuple:
        """The erase rows' (k, prompt, ...) interleaved with those `retain` draws from retain_key."""
        return tuple(interleaved(a, b, devices) for a, b in zip(erase, retain, strict=True))

    # The replicated weights meet each device's own samples inside lax loops; JAX's varying-axis check
    # would want every such use marked with lax.pvary, which would say nothing the specs do not. The
    # weights enter as they are placed: replicated, or sharded (FSDP, parallel.local_specs).
    batch = P(AXIS)
    rows = NamedSharding(mesh, batch)

    replicated = NamedSharding(mesh, P())
    robust_out = {} if robust is None else {"adversary": replicated, "attack_loss": replicated}

    @functools.partial(jax.jit, out_shardings=Pairs(rows, rows, rows, rows, **robust_out))
    def pairs(state: TrainState, frozen, original, prompts: Prompts, cache=None) -> Pairs:
        drawn = drawn_pairs(state, frozen, original, prompts, cache)
        return drawn if robust is None else with_adversary(state, frozen, original, prompts, drawn)

    def drawn_pairs(state: TrainState, frozen, original, prompts: Prompts, cache=None) -> Pairs:
        if cache is not None:
            j, k = pair_draws(state.rng, state.step, trajectories, objective.ddim_steps, global_batch, refresh_every)
            if prompts.retain is not None:
                rj, rk = pair_draws(
                    retain_key(state.rng), state.step, trajectories, objective.ddim_steps, global_batch, refresh_every
                )
                j, k = with_retained((j, k), (rj + cache.x_t.shape[0] // 2, rk))
            return Pairs(x_t=cache.x_t[j, k], target=cache.target[j, k], prompt=cache.prompt[j], k=k)
        n, draws = conditioning.count(prompts.concept), (state.step, global_batch, objective.ddim_steps)
        k, prompt, noise_keys = sample_draws(state.rng, *draws, n)
        if prompts.retain is not None:
            rk, rp, rkeys = sample_draws(retain_key(state.rng), *draws, conditioning.count(prompts.retain))
            k, prompt, noise_keys = with_retained((k, prompt, noise_keys), (rk, rp + n, rkeys))
        trainable = marked(state.trainable)
        weights = parallel.local_specs(trainable), parallel.local_specs(frozen), parallel.local_specs(original)
        sampled = jax.shard_map(
            local_sampled,
            mesh=mesh,
            in_specs=(*weights, P(), batch, batch, batch),
            out_specs=batch,
            check_vma=False,
        )
        x_t, target = sampled(trainable, frozen, original, prompts, k, prompt, noise_keys)
        return Pairs(x_t=x_t, target=target, prompt=prompt, k=k)

    # `original` is an argument of the update for LoRA runs, whose trained model is the frozen originals
    # plus the adapters; a full-weight run's update does not use it, and jit leaves it out of the program.
    @functools.partial(jax.jit, donate_argnums=(0,))
    def update(state: TrainState, frozen, original, prompts: Prompts, pairs: Pairs):
        trainable = marked(state.trainable)
        weights = parallel.local_specs(trainable), parallel.local_specs(original), parallel.local_specs(frozen)
        trained = jax.shard_map(
            local_trained,
            mesh=mesh,
            in_specs=(*weights, P(), batch, batch, batch, batch, P()),
            out_specs=(P(), parallel.local_specs(trainable)),
            check_vma=False,
        )
        losses, grads = trained(
            trainable,
            original,
            frozen,
            prompts,
            pairs.x_t,
            timesteps[pairs.k],
            pairs.prompt,
            pairs.target,
            pairs.adversary,
        )
        grads = parallel.restructured(grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = TrainState(state.step + 1, trainable, opt_state, state.rng, pairs.adversary)
        # Replicated, so every host can read the metrics. `finite` checks the new weights as well as the
        # losses: a finite loss can still take an overflowing step. k is every row's (interleaved).
        k = jax.lax.with_sharding_constraint(pairs.k, NamedSharding(mesh, P()))
        finite = all_finite(losses) & all_finite(trainable)
        attack = {} if pairs.attack_loss is None else {"attack_loss": pairs.attack_loss}
        return new_state, {**losses, **attack, "k": k, "finite": finite}

    return TrainStep(pairs, update)
