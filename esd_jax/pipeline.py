"""Loading and saving a Stable Diffusion pipeline (SD 1.x, 2.x, SDXL) in the diffusers folder format.

`load_pipeline` reads a local diffusers folder or a Hugging Face hub id (safetensors only, never
pickles) into Flax NNX modules; `StableDiffusion.save_pretrained` writes a folder that current
diffusers' `StableDiffusionPipeline` (`StableDiffusionXLPipeline`) `.from_pretrained` loads with no
missing or unexpected keys. SDXL's pipeline has a second tokenizer and text encoder.
"""

import dataclasses
import json
import math
import os
import shutil
import types
import typing
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from esd_jax import conditioning, weights
from esd_jax.config import EMBEDDED_NAME
from esd_jax.errors import UserError
from esd_jax.files import atomic_dir
from esd_jax.hub import local_folder
from esd_jax.models import clip, unet, vae
from esd_jax.schedulers import NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Components esd-jax owns, with the file names diffusers and transformers give their weights.
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",  # SDXL only
}
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    *(f"{c}/{p}" for c in WEIGHT_FILES for p in ("config.json", WEIGHT_FILES[c])),
]
# Each pipeline class esd-jax reads, with the networks it holds.
NETWORKS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
# The embedded model's folder: what the model name EMBEDDED_NAME means everywhere.
EMBEDDED = Path(__file__).parent / "toy" / "pipeline"
# Hub ids whose configs esd-jax carries (known_models/), so that `esd-jax plan` needs neither the hub nor
# the weights; each folder copies the hub repository's model_index.json and config files.
KNOWN_ROOT = Path(__file__).parent / "known_models"
KNOWN_MODELS = {
    "CompVis/stable-diffusion-v1-4": "stable-diffusion-v1",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1",
    "stabilityai/stable-diffusion-2-1": "stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
}
# Keys read straight from a config.json (the native image size, the latent shape) rather than through the
# config classes' defaults, so a file must have them.
REQUIRED_KEYS = {"unet": ("sample_size", "in_channels", "down_block_types"), "vae": ("block_out_channels",)}
# A number in a network config is a size, a count, a scale or an epsilon, so positive; these may be 0.
MAY_BE_ZERO = ("freq_shift", "downsample_padding", "dropout", "pad_token_id", "bos_token_id", "eos_token_id")


def resolve_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass
class StableDiffusion:
    """The networks, tokenizer and scheduler settings of one pipeline.

    `configs` holds each network's config.json as read (or as built), so a saved pipeline carries
    exactly the configuration it was loaded with; `source` is the folder it came from, whose
    components esd-jax does not own (safety checker, feature extractor) are copied on save. SDXL's
    pipeline also has `text_encoder_2` (a CLIPTextModelWithProjection) and `tokenizer_2`.
    """

    unet: unet.UNet2DConditionModel
    text_encoder: clip.CLIPTextModel
    vae: vae.AutoencoderKL
    tokenizer: CLIPTokenizer | None  # None in a pipeline of shapes only (networks_at, abstract_pipeline)
    scheduler_config: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    model_index: dict[str, Any]
    source: Path | None = None
    text_encoder_2: clip.CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def networks(self) -> tuple[str, ...]:
        """The names of the networks this pipeline holds, as its folder's subfolders."""
        return NETWORKS["StableDiffusionXLPipeline" if self.is_xl else "StableDiffusionPipeline"]

    @property
    def text_encoders(self) -> tuple[nnx.Module, ...]:
        return (self.text_encoder, self.text_encoder_2) if self.is_xl else (self.text_encoder,)

    @property
    def zero_null(self) -> bool:
        """Whether the unconditional ("") prompt is all zeros rather than encoded: SDXL's
        force_zeros_for_empty_prompt, which diffusers' SDXL pipeline applies when no negative prompt is given."""
        return self.is_xl and bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    @property
    def native_resolution(self) -> int:
        """The side in pixels of the images the model makes by default: the UNet's latent side times the
        VAE's downsampling (one halving per block after the first)."""
        return self.configs["unet"]["sample_size"] * self.vae_factor

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    def latent_shape(self, resolution: int = 0) -> tuple[int, int, int]:
        """(C, h, w) of the latents of square images of `resolution` pixels (0: the native size)."""
        size = resolution or self.native_resolution
        multiple = self.vae_factor * 2 ** (len(self.configs["unet"]["down_block_types"]) - 1)
        if size <= 0 or size % multiple:
            raise UserError(
                f"resolution {size}: this model takes multiples of {multiple} pixels (native: {self.native_resolution})"
            )
        return self.configs["unet"]["in_channels"], size // self.vae_factor, size // self.vae_factor

    def token_ids(self, prompts: list[str], tokenizer: CLIPTokenizer | None = None) -> np.ndarray:
        """[n, L] int32 token ids (of `tokenizer`, default the first), padded to the tokenizer's length as
        diffusers' pipelines pad them."""
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
        ).input_ids.astype(np.int32)

    def prompt_ids(self, prompts: list[str]) -> tuple[np.ndarray, ...]:
        """The token ids of `prompts` for each text encoder: SDXL's two tokenizers pad differently."""
        tokenizers = (self.tokenizer, self.tokenizer_2) if self.is_xl else (self.tokenizer,)
        return tuple(self.token_ids(prompts, t) for t in tokenizers)

    def time_ids(self, resolution: int = 0) -> np.ndarray | None:
        """SDXL's time ids for square images of `resolution` pixels (0: native); None for SD 1.x/2.x."""
        return conditioning.time_ids(resolution or self.native_resolution) if self.is_xl else None

    def encode(self, prompts: list[str], resolution: int = 0) -> conditioning.Conditioning:
        """The UNet conditioning of `prompts` [n, ...] (esd_jax.conditioning), as diffusers' pipeline encodes
        a prompt; for the unconditional prompt of classifier-free guidance use `null`."""
        ids = tuple(jnp.asarray(i) for i in self.prompt_ids(prompts))
        return encoded(self.text_encoders, ids, self.time_ids(resolution))

    def null(self, cond: conditioning.Conditioning) -> conditioning.Conditioning:
        """The unconditional prompt's conditioning, given `cond`, the encoded "": itself, or zeroed (zero_null)."""
        return conditioning.zeroed(cond) if self.zero_null else cond

    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Writes a diffusers folder; a crash midway leaves any earlier folder at `out_dir` intact.

        `extra` maps file names to JSON objects written in the folder beside model_index.json.
        """
        with atomic_dir(Path(out_dir)) as tmp:
            for name, obj in (extra or {}).items():
                write_json(tmp / name, obj)
            for name in self.networks:
                (tmp / name).mkdir()
                write_json(tmp / name / "config.json", self.configs[name])
                weights.write_safetensors(weights.state_dict(getattr(self, name)), tmp / name / WEIGHT_FILES[name])
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.is_xl:
                self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
            (tmp / "scheduler").mkdir()
            write_json(tmp / "scheduler" / "scheduler_config.json", self.scheduler_config)
            index = dict(self.model_index)
            for name, value in self.model_index.items():
                if name in (*WEIGHT_FILES, "tokenizer", "tokenizer_2", "scheduler") or not isinstance(value, list):
                    continue
                if self.source is not None and (self.source / name).is_dir():
                    shutil.copytree(self.source / name, tmp / name)
                elif value != [None, None]:
                    index[name] = [None, None]
                    if name == "safety_checker":
                        index["requires_safety_checker"] = False
            write_json(tmp / "model_index.json", index)


encoded = nnx.jit(conditioning.encode)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"{path} is missing; a diffusers Stable Diffusion folder has model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds {json_kind(value)}, not an object of keys and values")
    return value


def json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "null"


def describe(annotation: Any, low: str) -> str:
    """A config field's annotation as the JSON it takes ("positive int or list of positive ints")."""
    if isinstance(annotation, types.UnionType):
        return " or ".join(describe(a, low) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"list of {count}{describe(args[0], low)}s"
    if annotation in (int, float):
        name = "int" if annotation is int else "number"
        return f"{low} {name}" if low == "positive" else f"{name} {low}"
    return {bool: "true or false", str: "string", type(None): "null"}[annotation]


def fits(value: Any, annotation: Any, low: str) -> bool:
    """Whether a config.json value has the annotated type (a JSON list stands for a tuple), numbers `low`."""
    if isinstance(annotation, types.UnionType):
        return any(fits(value, a, low) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, list | tuple) or not value:
            return False
        args = typing.get_args(annotation)
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return len(items) == len(value) and all(fits(v, a, low) for v, a in zip(value, items, strict=True))
    if annotation in (int, float):
        kind = int if annotation is int else int | float
        if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return value > 0 if low == "positive" else value >= 0
    return isinstance(value, annotation)


def check_config(name: str, config: dict[str, Any], config_cls: type, path: Path) -> None:
    """Refuses a value of the wrong type or sign here, naming its key, rather than deep inside building a
    network (a ZeroDivisionError) or silently ("yes" for a flag)."""
    for key in REQUIRED_KEYS.get(name, ()):
        if key not in config:
            raise UserError(f"{path}: the key {key!r} is missing; copy it from the model's original config.json")
    if name == "unet" and not fits(config["sample_size"], int, "positive"):  # the native size must be square
        raise UserError(
            f"{path}: sample_size={json.dumps(config['sample_size'])} is not supported; "
            "expected positive int, the latent side (64 for SD 1.x, 96 for SD 2.1)"
        )
    for field in dataclasses.fields(config_cls):
        low = ">= 0" if field.name in MAY_BE_ZERO else "positive"
        # A key annotated None has one supported value: the config class's own check explains it better.
        if field.name in config and field.type is not None and not fits(config[field.name], field.type, low):
            raise UserError(
                f"{path}: {field.name}={json.dumps(config[field.name])} is not valid; "
                f"expected {describe(field.type, low)}"
            )


def locate(model: str | os.PathLike) -> Path:
    """A local folder for `model`: the embedded toy pipeline ("toy"), the folder itself, or the hub
    snapshot from huggingface_hub's cache. (A local folder named toy is "./toy".)"""
    if str(model) == EMBEDDED_NAME:
        if not (EMBEDDED / "model_index.json").is_file():
            raise UserError(f"the embedded toy model is missing from {EMBEDDED}; reinstall esd-jax")
        return EMBEDDED
    return local_folder(model, HUB_PATTERNS, "model", "CompVis/stable-diffusion-v1-4")


def weight_file(folder: Path, name: str) -> Path:
    """The safetensors weights of one component; pickles are refused."""
    plain = folder / WEIGHT_FILES[name]
    if plain.is_file():
        return plain
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise UserError(
            f"{folder}: several weight files ({', '.join(c.name for c in candidates)}) and no {plain.name}; keep one"
        )
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise UserError(
            f"{folder}: only PyTorch pickle weights ({', '.join(pickles)}); esd-jax reads "
            "safetensors only: convert them (diffusers' save_pretrained writes safetensors)"
        )
    raise UserError(f"{folder}: no {plain.name}")


# Each network: its config class, its module and the key renaming its checkpoints need.
SPECS = {
    "unet": (unet.UNetConfig, unet.UNet2DConditionModel, lambda t: t),
    "vae": (vae.VAEConfig, vae.AutoencoderKL, vae.normalize_keys),
    "text_encoder": (clip.CLIPTextConfig, clip.CLIPTextModel, clip.normalize_keys),
    "text_encoder_2": (clip.CLIPTextConfig, clip.CLIPTextModelWithProjection, clip.normalize_keys),
}


def build_abstract(name: str, config: dict[str, Any], path: Path, **kw: Any) -> nnx.Module:
    """The network `name` from its config.json `config` read at `path`, shapes only (no random init of weights
    about to be replaced). Any failure is the file's fault, and says so."""
    config_cls, model_cls, _ = SPECS[name]
    check_config(name, config, config_cls, path)
    try:
        parsed = config_cls.from_dict(config)
        return nnx.eval_shape(lambda: model_cls(parsed, **kw, rngs=nnx.Rngs(0)))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"{path}: cannot build the {name} from this config ({type(e).__name__}: {first}); "
            "compare it with the model's original config.json"
        ) from None


def networks_at(root: Path, dtype: str, param_dtype: str = "float32") -> StableDiffusion:
    """The pipeline of the diffusers folder `root` with its networks as shapes only and no tokenizer, every
    config checked; no weights are read."""
    compute, params = resolve_dtype(dtype), resolve_dtype(param_dtype)
    model_index = read_json(root / "model_index.json")
    kind = model_index.get("_class_name")
    if kind not in NETWORKS:
        raise UserError(
            f"{root / 'model_index.json'}: pipeline {kind!r} is not supported yet; supported: "
            f"{', '.join(NETWORKS)} (SD 1.x and 2.x, SDXL)"
        )
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    try:  # the schedule training and DDIM sampling build: a nonsense value fails here, not after compiling
        NoiseSchedule.from_config(scheduler_config)
    except UserError as e:
        raise UserError(f"{scheduler_path}: {e}") from None
    for name in NETWORKS[kind]:
        if not (root / name).is_dir():
            folders = ", ".join(f"{n}/" for n in NETWORKS[kind])
            raise UserError(f"{root / name} is missing; a {kind} folder has {folders}, tokenizer/ and scheduler/")
    configs = {name: read_json(root / name / "config.json") for name in NETWORKS[kind]}
    if (configs["unet"].get("addition_embed_type") == "text_time") != (kind == "StableDiffusionXLPipeline"):
        raise UserError(
            f"{root}: model_index.json names a {kind} but unet/config.json has addition_embed_type="
            f"{json.dumps(configs['unet'].get('addition_embed_type'))}; SDXL's UNet ('text_time') belongs to a "
            "StableDiffusionXLPipeline, any other to a StableDiffusionPipeline"
        )
    # SDXL's VAE overflows in float16, so its pipeline decodes in float32 where the config says force_upcast.
    upcast = kind == "StableDiffusionXLPipeline" and configs["vae"].get("force_upcast", True)
    modules = {
        name: build_abstract(
            name,
            configs[name],
            root / name / "config.json",
            dtype=jnp.float32 if name == "vae" and upcast and compute == jnp.float16 else compute,
            param_dtype=params,
        )
        for name in NETWORKS[kind]
    }
    return StableDiffusion(
        **modules,
        tokenizer=None,
        scheduler_config=scheduler_config,
        configs=configs,
        model_index=model_index,
        source=root,
    )


def abstract_pipeline(model: str | os.PathLike, dtype: str = "float32") -> StableDiffusion:
    """The pipeline `model` as shapes only, from its configs alone (no weights, no tokenizer): a folder that
    holds just the config files will do, and the hub ids of KNOWN_MODELS need no download."""
    resolve_dtype(dtype)
    return networks_at(KNOWN_ROOT / KNOWN_MODELS[str(model)] if str(model) in KNOWN_MODELS else locate(model), dtype)


def load_pipeline(model: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32") -> StableDiffusion:
    """Loads a Stable Diffusion pipeline from a diffusers folder or a Hugging Face hub id.

    `dtype` is the compute dtype of every network; parameters are stored in `param_dtype`
    (float32 by default: fine-tuning needs it). Every config is checked before any weights are read.
    """
    resolve_dtype(dtype), resolve_dtype(param_dtype)  # a bad name fails before anything is read
    root = locate(model)
    pipe = networks_at(root, dtype, param_dtype)
    pipe.tokenizer = load_tokenizer(root / "tokenizer")
    if pipe.is_xl:
        pipe.tokenizer_2 = load_tokenizer(root / "tokenizer_2")
    for name in pipe.networks:
        path = weight_file(root / name, name)
        weights.load_state_dict(getattr(pipe, name), SPECS[name][2](weights.read_safetensors(path)), source=str(path))
    return pipe


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    # transformers builds a tokenizer from an empty folder without complaint, one that maps every word to one id.
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise UserError(f"{folder}: no tokenizer.json or vocab.json; a diffusers folder has the CLIP tokenizer there")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{folder}: not a readable CLIP tokenizer ({type(e).__name__}: {first})") from None


def new_pipeline(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_config: dict[str, Any],
    tokenizer: CLIPTokenizer,
    scheduler_config: dict[str, Any],
    seed: int = 0,
    abstract: bool = False,
) -> StableDiffusion:
    """A randomly initialised pipeline (float32) from diffusers/transformers config dicts.

    With `abstract` the parameters are shapes only (nnx.eval_shape), for a caller that fills them: eager
    random initialisation compiles one XLA program per parameter shape, which takes minutes on a busy CPU.
    """
    unet_cfg, vae_cfg = unet.UNetConfig.from_dict(unet_config), vae.VAEConfig.from_dict(vae_config)
    text_cfg = clip.CLIPTextConfig.from_dict(text_config)
    if abstract:
        modules = [
            nnx.eval_shape(lambda cls=cls, cfg=cfg: cls(cfg, rngs=nnx.Rngs(seed)))
            for cls, cfg in (
                (unet.UNet2DConditionModel, unet_cfg),
                (clip.CLIPTextModel, text_cfg),
                (vae.AutoencoderKL, vae_cfg),
            )
        ]
    else:
        rngs = nnx.Rngs(seed)
        modules = [
            unet.UNet2DConditionModel(unet_cfg, rngs=rngs),
            clip.CLIPTextModel(text_cfg, rngs=rngs),
            vae.AutoencoderKL(vae_cfg, rngs=rngs),
        ]
    return StableDiffusion(
        unet=modules[0],
        text_encoder=modules[1],
        vae=modules[2],
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        configs={"unet": unet_cfg.to_dict(), "vae": vae_cfg.to_dict(), "text_encoder": text_cfg.to_dict()},
        model_index={
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
