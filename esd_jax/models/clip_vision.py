"""CLIP's vision tower and the whole CLIPModel (transformers' CLIPVisionModel and CLIPModel) in Flax NNX,
with the image preprocessing and the score of a CLIP-score judge.

Parameter names are transformers 5's (`vision_model.embeddings.patch_embedding.weight`,
`visual_projection.weight`, `logit_scale`, ...). The text side is clip.py's TextTransformer, and the
vision encoder is built of the same layers, attending without a causal mask. `CLIPModel.image_embeds`
and `text_embeds` equal transformers' `get_image_features` and `get_text_features`; `preprocess` follows
CLIPImageProcessor from uint8 images to pixel values and `clip_score` is torchmetrics' CLIPScore per pair.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esd_jax import weights
from esd_jax.errors import UserError
from esd_jax.models import clip
from esd_jax.models.layers import Conv2d, Dtype, Embedding, LayerNorm, Linear, value

# CLIPImageProcessor's defaults (transformers' OPENAI_CLIP_MEAN and OPENAI_CLIP_STD), which the
# preprocessor_config.json of every openai/clip-vit-* checkpoint repeats.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PreTrainedConfig's generation and bookkeeping attributes, which transformers 4 wrote in full into both
# sub-configs of a CLIPModel config.json (openai/clip-vit-large-patch14's among them); none of them enters
# the forward pass.
LEGACY_KEYS = (
    "add_cross_attention",
    "bad_words_ids",
    "begin_suppress_tokens",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_decoder_ids",
    "forced_eos_token_id",
    "is_decoder",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "prefix",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torchscript",
    "typical_p",
    "use_bfloat16",
)
# The token ids every PreTrainedConfig has, written (as null) into vision configs too: images have no tokens.
VISION_IGNORED_KEYS = (*clip.IGNORED_KEYS, "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig; defaults are transformers' (ViT-B/32). projection_dim does not enter
    the tower (CLIPConfig's own projection_dim sizes visual_projection) but is kept as transformers keeps it."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            # transformers' annotation also admits lists for image_size and patch_size; its model does not.
            if field.type is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise UserError(f"vision encoder config key {field.name!r} is {v!r}; expected a positive int")
        if not (isinstance(self.layer_norm_eps, int | float) and self.layer_norm_eps > 0):
            raise UserError(f"vision encoder config key 'layer_norm_eps' is {self.layer_norm_eps!r}; expected > 0")
        clip.check_encoder(self, "vision encoder")
        if self.patch_size > self.image_size:
            raise UserError(
                f"vision encoder config key 'patch_size' ({self.patch_size}) is larger than image_size "
                f"({self.image_size})"
            )

    @property
    def num_positions(self) -> int:
        """The class token and one per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPVisionConfig":
        """From a transformers config.json; keys starting with "_" (`_name_or_path`) are bookkeeping."""
        kwargs = clip.config_kwargs(
            cls, d, model_type="clip_vision_model", what="vision encoder", ignored=VISION_IGNORED_KEYS
        )
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' CLIPConfig: the two towers' configs, the shared embedding width and the initial
    logit scale (ln 1/0.07, CLIP's temperature), which a checkpoint's `logit_scale` replaces."""

    text_config: clip.CLIPTextConfig = dataclasses.field(default_factory=clip.CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """From a transformers CLIPModel config.json. Where transformers 4 also wrote `text_config_dict` or
        `vision_config_dict`, these override the sub-config, as transformers reads them."""
        towers = ("text_config", "vision_config")
        sub_keys = (*towers, "text_config_dict", "vision_config_dict")
        kwargs = clip.config_kwargs(
            cls, {k: v for k, v in d.items() if k not in sub_keys}, model_type="clip", what="CLIP model"
        )
        for name, parse in zip(towers, (clip.CLIPTextConfig.from_dict, CLIPVisionConfig.from_dict), strict=True):
            merged = {**(d.get(name) or {}), **(d.get(f"{name}_dict") or {})}
            kwargs[name] = parse({k: v for k, v in merged.items() if k not in LEGACY_KEYS})
        return cls(**kwargs)


class VisionEmbeddings(nnx.Module):
    """The class token, then one token per patch (a convolution with stride = kernel = patch), plus a
    learned position embedding each."""

    def __init__(self, config: CLIPVisionConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (d,), param_dtype))
        self.patch_embedding = Conv2d(config.num_channels, d, p, stride=p, bias=False, **kw)
        self.position_embedding = Embedding(config.num_positions, d, **kw)
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, C, S, S] -> [B, 1 + (S / P)^2, D]
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))  # [B, S / P, S / P, D]
        b, _, _, d = patches.shape
        cls = jnp.broadcast_to(value(self.class_embedding).astype(self.dtype), (b, 1, d))
        # Row-major patches, as transformers' flatten(2) of its [B, D, S / P, S / P] orders them.
        x = jnp.concatenate([cls, patches.reshape(b, -1, d)], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))


class VisionTransformer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embeddings = VisionEmbeddings(config, **kw, rngs=rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)  # sic, transformers'
        self.encoder = clip.Encoder(config, causal=False, **kw, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.image_size = config.image_size

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values [B, C, S, S] -> (last_hidden_state [B, 1 + (S / P)^2, D], pooled [B, D]): the pooled
        output is the class token's last state after post_layernorm."""
        if pixel_values.shape[2:] != (self.image_size, self.image_size):
            raise UserError(
                f"vision encoder: images of {pixel_values.shape[2]}x{pixel_values.shape[3]} pixels; its "
                f"image_size is {self.image_size} (resize them with clip_vision.preprocess)"
            )
        last = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return last, self.post_layernorm(last[:, 0])


class CLIPVisionModel(nnx.Module):
    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        # The extra level gives the parameters the `vision_model.` prefix, as CLIPModel's vision tower has.
        self.vision_model = VisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values [B, C, S, S] -> (last_hidden_state [B, 1 + (S / P)^2, D], pooled [B, D])."""
        return self.vision_model(pixel_values)


class CLIPModel(nnx.Module):
    def __init__(
        self, config: CLIPConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        text, vision, dim = config.text_config, config.vision_config, config.projection_dim
        self.config = config
        self.text_model = clip.TextTransformer(text, **kw)
        self.vision_model = VisionTransformer(vision, **kw)
        self.visual_projection = Linear(vision.hidden_size, dim, bias=False, **kw)
        self.text_projection = Linear(text.hidden_size, dim, bias=False, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, C, S, S] (from `preprocess`) -> [B, projection_dim], not normalised."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> [B, projection_dim], not normalised: the end-of-text token's last state.

        No attention mask is needed: the text tower is causal, so padding after the end-of-text token
        (CLIPProcessor's, with or without its mask) never reaches the pooled state."""
        config = self.config.text_config
        last = self.text_model(clip.checked_ids(config, input_ids))
        return self.text_projection(last[jnp.arange(last.shape[0]), clip.eos_positions(config, input_ids)])


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """[N] CLIP scores of N (image, text) pairs of embeddings [N, projection_dim]: 100 * max(cos, 0),
    torchmetrics' CLIPScore(I, C) as its documentation defines it.

    torchmetrics' code clamps the mean over pairs instead, max(mean(100 * cos), 0): the mean of these
    scores equals its value whenever no pair's cosine is negative (real CLIP pairs are at 0.1 to 0.4)."""
    a = image_embeds.astype(jnp.float32)
    b = text_embeds.astype(jnp.float32)
    cos = jnp.sum(a * b, axis=-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return 100 * jnp.maximum(cos, 0)


def preprocess(
    images: jax.Array,
    size: int,
    *,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> jax.Array:
    """uint8 images [N, H, W, 3] -> pixel_values [N, 3, size, size], CLIPImageProcessor's steps: the shorter
    side resized to `size` (bicubic, the longer one to int(size * long / short)), the centre size x size
    cropped, scaled by 1/255 and normalised with `mean` and `std`.

    Approximate only where the resampling differs from PIL's. PIL's bicubic (a = -0.5, widened by the
    scale when downsizing) is jax.image's antialiased "cubic"; it runs in two passes, each rounded and
    clipped to uint8, which this repeats, in Pillow 13's order: the vertical pass first where the height
    shrinks by more than twice as many pixels as the width, else the horizontal. What remains is PIL's
    22-bit fixed-point weights: a value near a rounding boundary may land one level (1/255, 0.015 after
    normalisation) off, about one value in a thousand on random images (tests/test_clip_vision.py).
    """
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess takes uint8 images [N, H, W, 3], not {images.dtype} {images.shape}")
    _, h, w, _ = images.shape
    # transformers' get_resize_output_image_size(default_to_square=False): the longer side truncated.
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    x = images.astype(jnp.float32)
    passes = [(2, nw), (1, nh)]  # (axis, new length): horizontal first
    if h - nh > 0 and h - nh > 2 * (w - nw):
        passes.reverse()
    for axis, n in passes:
        if x.shape[axis] != n:
            shape = list(x.shape)
            shape[axis] = n
            # PIL rounds half up ((x + 2^21) >> 22) and clips to 0..255 after each pass.
            x = jnp.clip(jnp.floor(jax.image.resize(x, shape, "cubic", antialias=True) + 0.5), 0, 255)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top : top + size, left : left + size]
    x = (x * jnp.float32(1 / 255) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.transpose(0, 3, 1, 2)


def normalize_keys(tensors: dict) -> dict:
    """A CLIPModel checkpoint's tensors without the position_ids buffers transformers 4 once saved."""
    buffers = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
    return {k: v for k, v in tensors.items() if k not in buffers}


def load_clip(folder: str | os.PathLike, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> CLIPModel:
    """The CLIPModel in `folder`, as transformers' save_pretrained writes it: config.json and model.safetensors."""
    folder = Path(folder)
    paths = {name: folder / name for name in ("config.json", "model.safetensors")}
    for path in paths.values():
        if not path.is_file():
            raise UserError(f"{path} is missing; a CLIP model folder has config.json and model.safetensors")
    try:
        raw = json.loads(paths["config.json"].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{paths['config.json']}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{paths['config.json']}: not an object of keys and values")
    try:
        config = CLIPConfig.from_dict(raw)
    except UserError as e:
        raise UserError(f"{paths['config.json']}: {e}") from None
    # Shapes only: every parameter is about to be replaced.
    model = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    tensors = normalize_keys(weights.read_safetensors(paths["model.safetensors"]))
    weights.load_state_dict(model, tensors, source=str(paths["model.safetensors"]))
    return model
