"""Robust erasure (AdvUnlearn: Zhang et al., NeurIPS 2024): ESD trained against the prompt that undoes it.

Every `every` iterations an inner attack searches, per concept c, a k-token embedding prefix p_c under
which the model being trained predicts again what the frozen model predicts under the concept, on the
step's own x_t (the attack of esd_jax.attack in the training loop, against the frozen model's noise
prediction instead of a base image's noise):
    p_c = argmin_p mean || e_theta(x_t, t, c(p, c)) - e_frozen(x_t, t, c) ||^2     (Adam, from the last p_c)
and every iteration trains the ESD target under the adversarial prompt beside the concept's own:
    loss = ESD(c) + ESD(c(p_c, c)) [+ lambda retain].
The prefixes are the run's state (checkpointed: a resumed run goes on with them); the first ones are the
embeddings of tokens drawn from the seed. The text encoder reads them, frozen, inside the step.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esd_jax import conditioning
from esd_jax.attack.search import adam_descent, allowed_tokens, random_embeddings
from esd_jax.errors import UserError
from esd_jax.parallel import AXIS

# Folded into the run's key for the first prefixes; a step never reaches it, and the others' streams are
# esd.py's (2**31 - 1 to - 3) and lora.py's (- 4).
ADVERSARY_STREAM = 2**31 - 5


@dataclasses.dataclass(frozen=True)
class Robust:
    every: int  # iterations between inner attacks
    steps: int  # Adam steps of one inner attack
    learning_rate: float
    tokens: int  # the prefix's length k


def robust_inputs(pipe, texts: list[str], tokens: int, seed: int) -> tuple[dict, jax.Array, Any]:
    """(Prompts.adversarial, the first prefixes [n, k, D], the text encoder's graph) of a robust run whose
    trained prompts are `texts`: the text encoder's weights and the prompts' ids with k slots
    (conditioning.with_slots); the first prefixes are the embeddings of tokens drawn from the seed."""
    if pipe.is_xl:
        raise UserError(
            "config.robust_every: robust erasure reads one text encoder's token embeddings: SD 1.x and 2.x, "
            "not SDXL's two; set config.robust_every=0"
        )
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = pipe.prompt_ids(texts)[0]
    fits = conditioning.slots_fit(ids, tokens, tokenizer.eos_token_id)
    if not fits.all():
        raise UserError(
            f"config.robust_tokens={tokens}: the prompt {texts[int(np.argmin(fits))]!r} leaves no room for the "
            f"prefix in the text encoder's {ids.shape[1]} tokens; lower it"
        )
    table = text_encoder.text_model.embeddings.token_embedding.weight[...].astype(jnp.float32)
    allowed = allowed_tokens(table.shape[0], tokenizer.all_special_ids)
    key = jax.random.fold_in(jax.random.key(seed), ADVERSARY_STREAM)
    first = random_embeddings(table, allowed, key, (len(texts), tokens))
    adversarial = {"encoder": nnx.state(text_encoder), "ids": jnp.asarray(conditioning.with_slots(ids, tokens))}
    return adversarial, first, nnx.graphdef(text_encoder)


def adversarial_cond(text_graphdef, adversarial: dict, adversary: jax.Array, prompt: jax.Array) -> dict:
    """The UNet conditioning of rows whose concepts `prompt` [B] names, each under its concept's prefix."""
    text_encoder = nnx.merge(text_graphdef, adversarial["encoder"])
    return {"encoder_hidden_states": text_encoder(adversarial["ids"][prompt], adversary[prompt])}


def attacked(model, frozen_model, text_graphdef, robust: Robust, adversarial, adversary, x_t, t, c, prompt):
    """(the prefixes [n, k, D] after one inner attack from `adversary`, its last loss) on one device's erase
    rows (x_t, t, their concepts' conditioning c and indices `prompt`); the gradient is averaged over the
    mesh, so every device ends with the same prefixes."""
    goal = jax.lax.stop_gradient(frozen_model(x_t, t, **c).astype(jnp.float32))

    def loss(prefix, step):
        pred = model(x_t, t, **adversarial_cond(text_graphdef, adversarial, prefix, prompt))
        value = jnp.mean(jnp.square(pred.astype(jnp.float32) - goal))
        return value, value

    prefix, curve = adam_descent(loss, adversary, robust.steps, robust.learning_rate, lambda g: jax.lax.pmean(g, AXIS))
    return prefix, jax.lax.pmean(curve[-1], AXIS)
