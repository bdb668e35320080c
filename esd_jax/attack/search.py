"""The adversarial prompt search (UnlearnDiffAtk, Zhang et al., ECCV 2024): the erased model is its own
classifier.

Given latents z_0 of an image of the concept drawn by the base model, k token embeddings p put before
the prompt (a prefix) are optimised with Adam so that the erased model denoises z_0's noisings well:
    min_p E_{t, eps} || e_theta(sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t, c(p, prompt)) - eps ||^2
(against v for v-prediction models), t uniform over the training timesteps. A prompt under which the
model denoises the concept's images well is one under which it draws them. Two attackers share the loop:
- "embedding": p is free in token-embedding space: the strongest attacker, one no person can type;
- "token": the forward pass reads p's nearest vocabulary tokens (cosine), the gradient passing straight
  through to p (PEZ: Wen et al., "Hard Prompts Made Easy", NeurIPS 2023); what comes out is a prompt
  of real tokens, which a person could type.
Every row of a batch is a prompt and an attack of its own: rows are sharded over the mesh and each device
runs its own, the randomness of every step from (seed, step, row) alone.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from esd_jax import parallel
from esd_jax.parallel import AXIS
from esd_jax.schedulers import NoiseSchedule

ATTACKERS = ("embedding", "token")
SEARCH_STREAM, EVALUATION_STREAM = 0, 1  # folded into the attack's key: the search's draws, the evaluation's


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What the compiled search depends on besides array shapes (hashable: a jit static argument)."""

    attacker: str  # "embedding" or "token"
    tokens: int  # the prefix's length k
    steps: int  # Adam steps
    learning_rate: float
    draws: int  # (t, eps) pairs per row and step
    num_train_timesteps: int
    prediction_type: str  # the scheduler's: "epsilon" or "v_prediction"


def noised(alphas_cumprod: jax.Array, z0: jax.Array, t: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, a_t) of latents z0 [N, C, H, W] at timesteps t [N] with noise eps: the forward process."""
    a = alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps, a


def nearest_tokens(prefix: jax.Array, table: jax.Array, allowed: jax.Array) -> jax.Array:
    """[B, k] the allowed vocabulary token (table [V, D], allowed [V] bool) of highest cosine similarity to
    each embedding of `prefix` [B, k, D]."""
    unit = table / jnp.linalg.norm(table, axis=-1, keepdims=True).clip(1e-12)
    similarity = prefix @ unit.T  # the prefix's norm does not change the argmax
    return jnp.argmax(jnp.where(allowed, similarity, -jnp.inf), axis=-1)


def row_losses(unet, text_encoder, settings: SearchSettings, alphas, ids, prefix, z0, t, eps) -> jax.Array:
    """[B] each row's denoising loss, the mean over its draws t [B, K] and eps [B, K, C, H, W], of z0 [B, C,
    H, W] under the prompt of ids [B, L] (and `prefix` [B, k, D] in its slots; None: the ids alone)."""
    b, k = t.shape
    cond = text_encoder(ids, prefix)  # [B, L, D]
    x, a = noised(alphas, jnp.repeat(z0, k, axis=0), t.reshape(-1), eps.reshape(b * k, *eps.shape[2:]))
    flat_eps = eps.reshape(x.shape)
    if settings.prediction_type == "v_prediction":
        target = jnp.sqrt(a) * flat_eps - jnp.sqrt(1 - a) * jnp.repeat(z0, k, axis=0)
    else:
        target = flat_eps
    pred = unet(x, t.reshape(-1), encoder_hidden_states=jnp.repeat(cond, k, axis=0)).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3)).reshape(b, k).mean(axis=1)


def row_draws(key: jax.Array, step, rows: jax.Array, settings: SearchSettings, shape: tuple[int, ...]):
    """(t [B, K], eps [B, K, C, H, W]) of `rows` [B] (their global indices) at `step`."""

    def one(row):
        row_key = jax.random.fold_in(jax.random.fold_in(key, step), row)
        t = jax.random.randint(jax.random.fold_in(row_key, 0), (settings.draws,), 0, settings.num_train_timesteps)
        return t, jax.random.normal(jax.random.fold_in(row_key, 1), (settings.draws, *shape))

    return jax.vmap(one)(rows)


def projected(prefix: jax.Array, table: jax.Array, allowed: jax.Array) -> jax.Array:
    """`prefix` forward as its nearest tokens' embeddings, backward as itself (the straight-through estimator)."""
    tokens = table[nearest_tokens(prefix, table, allowed)]
    return prefix + jax.lax.stop_gradient(tokens - prefix)


def allowed_tokens(vocab_size: int, special_tokens) -> np.ndarray:
    """[V] bool: the tokens an attack's prompt may hold: all but the special ones (start, end, padding)."""
    allowed = np.ones(vocab_size, bool)
    allowed[[t for t in special_tokens if 0 <= t < vocab_size]] = False
    return allowed


def random_embeddings(table: jax.Array, allowed: jax.Array, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[*shape, D] the embeddings (rows of table [V, D]) of allowed tokens drawn uniformly from `key`."""
    return table[jax.random.categorical(key, jnp.where(allowed, 0.0, -jnp.inf), shape=shape)]


def first_prefix(table: jax.Array, allowed: jax.Array, rows: jax.Array, key: jax.Array, tokens: int) -> jax.Array:
    """[B, k, D] where each row's search starts: the embeddings of k allowed tokens drawn from (key, row)."""
    return jax.vmap(lambda row: random_embeddings(table, allowed, jax.random.fold_in(key, row), (tokens,)))(rows)


def adam_descent(loss, init: jax.Array, steps: int, learning_rate: float, reduce=lambda grads: grads):
    """(x after `steps` Adam steps on loss(x, step) -> (value, aux) from `init`, aux of every step [steps,
    ...]); `reduce` maps the gradient first (an average over devices)."""
    optimizer = optax.adam(learning_rate)

    def body(carry, step):
        x, opt_state = carry
        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(x, step)
        updates, opt_state = optimizer.update(reduce(grads), opt_state, x)
        return (optax.apply_updates(x, updates), opt_state), aux

    (x, _), aux = jax.lax.scan(body, (init, optimizer.init(init)), jnp.arange(steps))
    return x, aux


def search_rows(unet, text_encoder, settings: SearchSettings, alphas, table, allowed, ids, z0, rows, key):
    """(prefix [B, k, D], losses [B, steps]) of one device's rows: Adam on the rows' prefixes (first_prefix)."""
    init = first_prefix(table, allowed, rows, jax.random.fold_in(key, settings.steps), settings.tokens)

    def total(prefix, step):
        t, eps = row_draws(key, step, rows, settings, z0.shape[1:])
        used = projected(prefix, table, allowed) if settings.attacker == "token" else prefix
        losses = row_losses(unet, text_encoder, settings, alphas, ids, used, z0, t, eps)
        return jnp.sum(losses), losses  # rows are independent: each prefix gets its own row's gradient

    prefix, losses = adam_descent(total, init, settings.steps, settings.learning_rate)
    return prefix, losses.T


class Attacker:
    """An erased model's UNet and text encoder placed on a mesh, and the compiled search against them."""

    def __init__(self, sampler, schedule: NoiseSchedule, vocab_size: int, special_tokens):
        """The UNet and text encoder that `sampler` (an esd_jax.sampling.Sampler of an SD 1.x/2.x pipeline)
        has placed; `special_tokens`:
        ids no attack prompt may hold (start, end, padding)."""
        self.mesh = sampler.mesh
        self.graphdefs = (sampler.graphdefs[0], sampler.graphdefs[2])
        self.states = (sampler.states[0], sampler.states[2])
        self.alphas = parallel.place(np.asarray(schedule.alphas_cumprod, np.float32), self.mesh)
        self.schedule = schedule
        self.allowed = parallel.place(allowed_tokens(vocab_size, special_tokens), self.mesh)

    def settings(self, attacker: str, tokens: int, steps: int, learning_rate: float, draws: int) -> SearchSettings:
        return SearchSettings(
            attacker=attacker,
            tokens=tokens,
            steps=steps,
            learning_rate=float(learning_rate),
            draws=draws,
            num_train_timesteps=self.schedule.num_train_timesteps,
            prediction_type=self.schedule.prediction_type,
        )

    def search(self, settings: SearchSettings, ids, z0, rows, key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(prefix [B, k, D], its nearest tokens [B, k], losses [B, steps]) of rows whose ids [B, L] hold
        k slots (conditioning.with_slots) and whose concept latents are z0 [B, C, H, W]; `rows` [B] are
        their indices in the whole attack (the randomness), B a multiple of the device count."""
        return search(
            self.states,
            self.alphas,
            self.allowed,
            ids,
            z0,
            rows,
            key,
            graphdefs=self.graphdefs,
            settings=settings,
            mesh=self.mesh,
        )

    def losses(self, settings: SearchSettings, ids, prefix, z0, rows, key) -> jax.Array:
        """[B] each row's denoising loss over `settings.draws` draws from (key, row) alone: the same draws for
        every prompt of a row, so the plain prompt and its attacks compare on equal terms."""
        return losses(
            self.states,
            self.alphas,
            ids,
            prefix,
            z0,
            rows,
            key,
            graphdefs=self.graphdefs,
            settings=settings,
            mesh=self.mesh,
        )


def merged(graphdefs, states):
    return tuple(nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True))


@functools.partial(jax.jit, static_argnames=("graphdefs", "settings", "mesh"))
def search(states, alphas, allowed, ids, z0, rows, key, *, graphdefs, settings: SearchSettings, mesh: Mesh):
    def local(states, alphas, allowed, ids, z0, rows, key):
        unet, text_encoder = merged(graphdefs, states)
        table = text_encoder.text_model.embeddings.token_embedding.weight[...].astype(jnp.float32)
        prefix, curve = search_rows(unet, text_encoder, settings, alphas, table, allowed, ids, z0, rows, key)
        return prefix, nearest_tokens(prefix, table, allowed), curve

    batch = P(AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), batch, batch, batch, P()),
        out_specs=(batch, batch, batch),
        # Replicated weights meet each device's own rows inside the scan, as in the ESD step.
        check_vma=False,
    )(states, alphas, allowed, ids, z0, rows, key)


@functools.partial(jax.jit, static_argnames=("graphdefs", "settings", "mesh"))
def losses(states, alphas, ids, prefix, z0, rows, key, *, graphdefs, settings: SearchSettings, mesh: Mesh):
    def local(states, alphas, ids, prefix, z0, rows, key):
        unet, text_encoder = merged(graphdefs, states)
        t, eps = row_draws(key, 0, rows, settings, z0.shape[1:])
        return row_losses(unet, text_encoder, settings, alphas, ids, prefix, z0, t, eps)

    batch = P(AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), batch, batch, batch, batch, P()),
        out_specs=batch,
        check_vma=False,
    )(states, alphas, ids, prefix, z0, rows, key)
