"""The settings of an erase run: one frozen dataclass holding every default, validated on entry.

configs/*.py start from `default_config()` (a ConfigDict generated from the dataclass, so no field is
declared twice) and change what their method needs; `EraseConfig.from_config_dict` turns the
command line's ConfigDict back into the dataclass and says what is wrong with it.
"""

import dataclasses
import math

import ml_collections

from esd_jax.errors import UserError
from esd_jax.partition import METHODS

# Training computes in these; parameters and optimizer state stay float32.
TRAIN_DTYPES = ("float32", "bfloat16")
# The ESD loss's gradient reaches the UNet's output as about 1e-6 per latent element at SD size, below
# float16's smallest normal number (6e-5): without loss scaling it trains on rounding noise.
FLOAT16_NOTE = " (float16 underflows the ESD gradients; bfloat16 has float32's range at the same memory)"
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class EraseConfig:
    model: str = "toy"  # a diffusers folder, a hub id, or "toy": the embedded toy pipeline
    concept: str = ""  # the prompt to erase; several separated by "|", one drawn per sample
    erase_from: str = ""  # optional prompt(s) to erase it from (official esd_sd.py's --erase_from); "": none
    method: str = "esd-x"  # which weights train; see esd_jax.partition.METHODS
    iterations: int = 1000  # the paper's 1000 steps
    learning_rate: float = 1e-5  # the paper's Adam learning rate
    # eta in target = e_base - eta (e_c - e_0). The official esd_sd.py's default --negative_guidance 2
    # without --erase_from computes e_c - 2 (e_c - e_0) = e_0 - 1 (e_c - e_0): that is eta = 1 here.
    negative_guidance: float = 1.0
    start_guidance: float = 3.0  # CFG scale of the partial sampling (official --guidance_scale 3)
    ddim_steps: int = 50  # DDIM steps of the partial sampling (official --num_inference_steps 50)
    resolution: int = 0  # image side in pixels; 0: the model's native resolution (512 for SD 1.x)
    batch_per_device: int = 1  # the paper trains on one sample per step
    xt_model: str = "frozen"  # which model samples x_t: "frozen" (official diffusers code) or "trainable" (paper)
    dtype: str = "float32"  # compute dtype: float32 or bfloat16; parameters and optimizer state stay float32
    seed: int = 0
    checkpoint_every: int = 100  # steps between (asynchronous) Orbax checkpoints
    keep_checkpoints: int = 3
    shard_params: bool = False  # shard frozen weights and optimizer state over the mesh (models too big for a chip)
    workdir: str = "runs/esd"

    @classmethod
    def from_config_dict(cls, config: ml_collections.ConfigDict) -> "EraseConfig":
        values = config.to_dict()
        unknown = sorted(values.keys() - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config key {unknown[0]!r}; see `esd-jax erase --help`")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"config.{key}={getattr(self, key)!r}: {why}")

        if not self.concepts or any(not c for c in self.concepts):
            raise bad("concept", "give the concept to erase, e.g. --config.concept='Van Gogh' (several: 'a|b')")
        if self.erase_from and len(self.erase_froms) not in (1, len(self.concepts)):
            raise bad("erase_from", f"give one prompt, or one per concept ({len(self.concepts)})")
        if self.method not in METHODS:
            raise bad("method", f"unknown method; choose one of {', '.join(METHODS)}")
        for key in ("iterations", "ddim_steps", "batch_per_device", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be a positive integer")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise bad("learning_rate", "must be a positive finite number (the paper's: 1e-5)")
        # eta < 0 would pull the model towards the concept; guidance < 0 samples away from it.
        if not (math.isfinite(self.negative_guidance) and self.negative_guidance >= 0):
            raise bad("negative_guidance", "eta must be a finite number >= 0 (the paper's: 1)")
        if not (math.isfinite(self.start_guidance) and self.start_guidance >= 0):
            raise bad("start_guidance", "the guidance scale must be a finite number >= 0 (the paper's: 3)")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"seeds are 32-bit: 0..{MAX_SEED} (jax.random.key takes no more)")
        if self.resolution < 0:
            raise bad("resolution", "must be a positive number of pixels, or 0 for the model's native size")
        if self.xt_model not in ("frozen", "trainable"):
            raise bad("xt_model", "choose 'frozen' or 'trainable'")
        if self.dtype not in TRAIN_DTYPES:
            raise bad(
                "dtype", f"choose one of {', '.join(TRAIN_DTYPES)}{FLOAT16_NOTE if self.dtype == 'float16' else ''}"
            )
        if not self.workdir:
            raise bad("workdir", "give a folder for checkpoints and outputs")

    @property
    def concepts(self) -> list[str]:
        return [c.strip() for c in self.concept.split("|")] if self.concept.strip() else []

    @property
    def erase_froms(self) -> list[str]:
        """One erase-from prompt per concept, or [] without erase_from."""
        if not self.erase_from.strip():
            return []
        froms = [f.strip() for f in self.erase_from.split("|")]
        return froms * len(self.concepts) if len(froms) == 1 else froms


# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "keep_checkpoints", "workdir")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(EraseConfig()))
