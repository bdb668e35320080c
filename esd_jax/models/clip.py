"""CLIP's text transformer (transformers' CLIPTextModel and CLIPTextModelWithProjection) in Flax NNX, the
prompt encoders of SD 1.x, 2.x and SDXL.

`CLIPTextModel(ids)` equals transformers' `CLIPTextModel(ids).last_hidden_state`, with its parameter
names (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...); `penultimate` is its
`hidden_states[-2]`, what SDXL conditions on, and CLIPTextModelWithProjection's `text_embeds` its
projected pooled output (SDXL's second encoder). There is no attention mask:
Stable Diffusion pipelines pass none, and causal attention already keeps padding out of every
position before it.
"""

import dataclasses
from typing import TYPE_CHECKING, Any, TypeAlias

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax.errors import UserError
from esd_jax.models.attention import attention
from esd_jax.models.layers import Dtype, Embedding, LayerNorm, Linear

if TYPE_CHECKING:  # the vision tower (clip_vision.py) is built of this file's encoder layers
    from esd_jax.models.clip_vision import CLIPVisionConfig

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, SD 1.x
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP ViT-H, SD 2.x
}

# config.json keys that do not change `last_hidden_state` (dropout is off at inference and the text
# encoder is never trained here), accepted and dropped: CLIPTextConfig's own, then the generic
# PreTrainedConfig ones that transformers' full `to_dict()` writes too.
IGNORED_KEYS = (
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "dropout",
    "torch_dtype",
    "dtype",
    "architectures",
    "transformers_version",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig; defaults are transformers'. The token ids and projection_dim do not
    enter `last_hidden_state` but are kept so that `to_dict` describes the same model."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int | tuple[int, ...] = 49407

    def __post_init__(self):
        check_encoder(self, "text encoder")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        """From a transformers config.json; keys starting with "_" (`_name_or_path`) are bookkeeping."""
        return cls(**config_kwargs(cls, d, model_type="clip_text_model", what="text encoder"))

    def to_dict(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
        """A config.json that transformers' `architecture` (CLIPTextModel or CLIPTextModelWithProjection)
        reads back to the same model."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"architectures": [architecture], "model_type": "clip_text_model", **fields}


def check_encoder(config, what: str) -> None:
    """What the text and vision towers' configs both need: a known activation, heads dividing the width."""
    if config.hidden_act not in ACTIVATIONS:
        raise UserError(
            f"{what} config key 'hidden_act' is {config.hidden_act!r}; supported: {', '.join(map(repr, ACTIVATIONS))}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise UserError(
            f"{what} config key 'hidden_size' ({config.hidden_size}) must be a multiple of "
            f"num_attention_heads ({config.num_attention_heads})"
        )


def config_kwargs(
    cls: type, d: dict[str, Any], *, model_type: str, what: str, ignored: tuple[str, ...] = IGNORED_KEYS
) -> dict[str, Any]:
    """The keyword arguments of the config dataclass `cls` in a transformers config.json `d` of `model_type`,
    `ignored` keys and "_" bookkeeping dropped; any other key `cls` lacks is a UserError naming `what`."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key == "model_type":
            if value != model_type:
                raise UserError(f"{what} config key 'model_type' is {value!r}; supported: {model_type!r}")
            continue
        if key not in names:
            raise UserError(
                f"{what} config key {key!r} is not supported; supported keys: "
                f"{', '.join(names + ['model_type', *ignored])}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value  # eos_token_id may be a list
    return kwargs


# The encoder layers read only the fields the text and vision configs share.
EncoderConfig: TypeAlias = "CLIPTextConfig | CLIPVisionConfig"


class Attention(nnx.Module):
    def __init__(self, config: EncoderConfig, *, causal: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = config.hidden_size
        self.q_proj = Linear(d, d, **kw)
        self.k_proj = Linear(d, d, **kw)
        self.v_proj = Linear(d, d, **kw)
        self.out_proj = Linear(d, d, **kw)
        self.num_heads = config.num_attention_heads
        self.causal = causal

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D]
        b, length, d = x.shape
        q, k, v = (
            p(x).reshape(b, length, self.num_heads, d // self.num_heads)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(attention(q, k, v, causal=self.causal).reshape(b, length, d))


class MLP(nnx.Module):
    def __init__(self, config: EncoderConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, **kw)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: EncoderConfig, *, causal: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(config, causal=causal, **kw, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.mlp = MLP(config, **kw, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, ids: jax.Array, prefix: jax.Array | None = None) -> jax.Array:  # [B, L] -> [B, L, D]
        tokens = self.token_embedding(ids)
        if prefix is not None:  # [B, n, D]: embeddings in place of the n tokens after the first
            tokens = jnp.concatenate([tokens[:, :1], prefix.astype(tokens.dtype), tokens[:, 1 + prefix.shape[1] :]], 1)
        return tokens + self.position_embedding(jnp.arange(ids.shape[1]))


class Encoder(nnx.Module):
    def __init__(self, config: EncoderConfig, *, causal: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                EncoderLayer(config, causal=causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class TextTransformer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embeddings = Embeddings(config, **kw, rngs=rngs)
        self.encoder = Encoder(config, causal=True, **kw, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def __call__(self, ids: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
        return self.final_layer_norm(self.encoder(self.embeddings(ids, prefix)))

    def states(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the hidden states before the last layer, the last layer's after the final layer norm)."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        return x, self.final_layer_norm(self.encoder.layers[-1](x))


class CLIPTextModel(nnx.Module):
    def __init__(
        self, config: CLIPTextConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        # The extra level gives the parameters the `text_model.` prefix of SD checkpoints.
        self.text_model = TextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
        """Token ids [B, L] -> last hidden states [B, L, hidden_size], final layer norm applied.

        `prefix` [B, n, hidden_size]: token embeddings that stand in for those of the n tokens after the
        first (an adversarial prompt's, esd_jax.attack), the tokens' ids there unread."""
        return self.text_model(self.checked(input_ids), prefix)

    def checked(self, input_ids: jax.Array) -> jax.Array:
        return checked_ids(self.config, input_ids)

    def penultimate(self, input_ids: jax.Array) -> jax.Array:
        """transformers' `hidden_states[-2]` [B, L, hidden_size]: the input of the last layer, no layer norm."""
        return self.text_model.states(self.checked(input_ids))[0]


def checked_ids(config: CLIPTextConfig, input_ids: jax.Array) -> jax.Array:
    """`input_ids` [B, L], refused if longer than the position table, which would silently clamp them."""
    if input_ids.shape[1] > config.max_position_embeddings:
        raise UserError(
            f"text encoder: {input_ids.shape[1]} tokens, more than its "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    return input_ids


def eos_positions(config: CLIPTextConfig, input_ids: jax.Array) -> jax.Array:
    """[B] where each row's end-of-text token is, as transformers finds it: the first eos_token_id, or
    for checkpoints from before transformers fixed their eos_token_id (2, SDXL's among them) the largest
    token id, which in CLIP's vocabulary is the end-of-text token."""
    if config.eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == config.eos_token_id, axis=-1)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel with `text_projection`, a bias-free linear of the pooled (end-of-text) state."""

    def __init__(
        self, config: CLIPTextConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = Linear(
            config.hidden_size, config.projection_dim, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def penultimate_and_text_embeds(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(hidden_states[-2] [B, L, hidden_size], text_embeds [B, projection_dim]) from one pass."""
        penultimate, last = self.text_model.states(self.checked(input_ids))
        pooled = last[jnp.arange(last.shape[0]), eos_positions(self.config, input_ids)]
        return penultimate, self.text_projection(pooled)


def normalize_keys(tensors: dict) -> dict:
    """The `text_model.`-prefixed keys of SD checkpoints, from either prefixed checkpoints (transformers 4,
    SD releases) or unprefixed ones (transformers 5's save_pretrained); the position_ids buffer is dropped."""
    out = {}
    for key, value in tensors.items():
        key = key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"
        if key != "text_model.embeddings.position_ids":
            out[key] = value
    return out
