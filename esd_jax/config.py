"""The settings of every command, one frozen dataclass each, every default declared once, validated on entry.

`EraseConfig` (esd-jax erase): configs/*.py start from `default_config()` (a ConfigDict generated from
the dataclass, so no field is declared twice) and change what their method needs;
`EraseConfig.from_config_dict` turns the command line's ConfigDict back into the dataclass and says what
is wrong with it. `SampleConfig`, `EvaluateConfig` and `AttackConfig` (esd-jax sample, evaluate, attack):
each field is a flag, its default and help text declared with it (the judges' settings, which evaluate and
attack share, once in JudgeOptions). Importing this module loads neither JAX nor Flax.
"""

import dataclasses
from pathlib import Path

import ml_collections

from esd_jax.errors import UserError
from esd_jax.partition import METHODS

# Training computes in these; parameters and optimizer state stay float32.
TRAIN_DTYPES = ("float32", "bfloat16")
# The ESD loss's gradient reaches the UNet's output as about 1e-6 per latent element at SD size, below
# float16's smallest normal number (6e-5): without loss scaling it trains on rounding noise.
FLOAT16_NOTE = " (float16 underflows the ESD gradients; bfloat16 has float32's range at the same memory)"
# The model that ships inside esd-jax (esd_jax/toy/pipeline, trained by esd_jax.toy.train).
EMBEDDED_NAME = "toy"
MAX_SEED = 2**32 - 1  # seeds are uint32: jax.random.key's range
FLOAT32_MAX = 3.4028234e38
# Four times SDXL's side: past it an image's latents and attention do not fit any accelerator.
MAX_RESOLUTION = 4096
MAX_IMAGES_PER_PROMPT = 100_000


@dataclasses.dataclass(frozen=True)
class EraseConfig:
    model: str = "toy"  # a diffusers folder, a hub id, or "toy": the embedded toy pipeline
    concept: str = ""  # the prompt to erase; several separated by "|", one drawn per sample
    erase_from: str = ""  # optional prompt(s) to erase it from (official esd_sd.py's --erase_from); "": none
    # Prompts whose images must not change, "|"-separated: each step also trains as many pairs sampled under
    # them towards the frozen model's own prediction there (esd.step_loss); "": the paper's ESD.
    retain: str = ""
    retain_weight: float = 1.0  # lambda in loss = ESD loss + lambda x retain loss
    # Robust erasure (esd_jax/robust.py, after AdvUnlearn): every this many iterations an inner attack finds the
    # prompt prefix that brings the concept back, and every step also trains the erasure under it; 0: plain ESD.
    robust_every: int = 0
    robust_steps: int = 10  # Adam steps of one inner attack
    robust_lr: float = 0.01  # its learning rate in token-embedding space (esd-jax attack's)
    robust_tokens: int = 5  # the prefix's length (UnlearnDiffAtk's and AdvUnlearn's 5)
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
    # The fast mode: > 0 samples this many frozen-model trajectories once and trains on the (x_t, target)
    # pairs at their every step (esd_jax/trajectories.py); 0 samples a partial trajectory per iteration.
    trajectories: int = 0
    refresh_every: int = 0  # with trajectories: sample fresh ones every this many iterations; 0: one cache for the run
    dtype: str = "float32"  # compute dtype: float32 or bfloat16; the trained weights and optimizer state stay float32
    # storage of the frozen weights and the trained ones' originals: bfloat16 halves the memory of the model
    frozen_dtype: str = "float32"
    seed: int = 0
    checkpoint_every: int = 100  # steps between (asynchronous) Orbax checkpoints
    log_every: int = 10  # steps between reads of the metrics from the device (one wait each); rows stay per step
    keep_checkpoints: int = 3
    shard_params: bool = False  # FSDP: shard the weights and optimizer state over the mesh (models too big for a chip)
    # > 0: train a LoRA of this rank on the method's layers instead of their weights (esd_jax/lora.py), the UNet
    # frozen; 0: the weights themselves. LECO, the LoRA tool of the ESD loss, defaults to rank 4, alpha 1.
    lora_rank: int = 0
    lora_alpha: float = 1.0  # the adapters run scaled by lora_alpha / lora_rank, kohya's convention
    workdir: str = "runs/esd"

    @classmethod
    def from_config_dict(cls, config: ml_collections.ConfigDict) -> "EraseConfig":
        values = config.to_dict()
        unknown = sorted(values.keys() - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config key {unknown[0]!r}; see `esd-jax erase --help`")
        model = Path(str(values.get("model", ""))).expanduser()
        if values.get("model") not in ("", EMBEDDED_NAME) and model.exists():
            # A run's model as an absolute folder: it resumes, samples and exports from any directory.
            values["model"] = str(model.resolve())
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"config.{key}={getattr(self, key)!r}: {why}")

        if not self.concepts or any(not c for c in self.concepts):
            raise bad("concept", "give the concept to erase, e.g. --config.concept='Van Gogh' (several: 'a|b')")
        if not self.model.strip():
            raise bad("model", "give a diffusers folder, a hub id, or toy")
        if self.erase_from and any(not f for f in self.erase_froms):
            raise bad(
                "erase_from", "an erase-from prompt is empty; give one prompt, or one per concept, each non-empty"
            )
        if self.erase_from and len(self.erase_froms) not in (1, len(self.concepts)):
            raise bad("erase_from", f"give one prompt, or one per concept ({len(self.concepts)})")
        if self.retain.strip() and any(not r for r in self.retains):
            raise bad("retain", "a retain prompt is empty; give prompts separated by '|', each non-empty")
        if not (0 <= self.retain_weight < FLOAT32_MAX):
            raise bad("retain_weight", "give a finite weight >= 0 for the retain loss (1: as much as the ESD loss)")
        if self.robust_every < 0:
            raise bad("robust_every", "give the iterations between inner attacks, or 0 for plain ESD")
        for key in ("robust_steps", "robust_tokens"):
            if getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        if not (0 < self.robust_lr < FLOAT32_MAX):
            raise bad("robust_lr", "must be a positive finite number (esd-jax attack's: 0.01)")
        if self.method not in METHODS:
            raise bad("method", f"unknown method; choose one of {', '.join(METHODS)}")
        for key in (
            "iterations",
            "ddim_steps",
            "batch_per_device",
            "checkpoint_every",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, key) <= 0:
                raise bad(key, "must be a positive integer")
        # Float32 is what the step computes in: a value past its range is infinite there.
        if not (0 < self.learning_rate < FLOAT32_MAX):
            raise bad("learning_rate", "must be a positive finite number (the paper's: 1e-5)")
        # eta < 0 would pull the model towards the concept; guidance < 0 samples away from it.
        if not (0 <= self.negative_guidance < FLOAT32_MAX):
            raise bad("negative_guidance", "eta must be a finite number >= 0 (the paper's: 1)")
        if not (0 <= self.start_guidance < FLOAT32_MAX):
            raise bad("start_guidance", "the guidance scale must be a finite number >= 0 (the paper's: 3)")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"seeds are 32-bit: 0..{MAX_SEED} (jax.random.key takes no more)")
        if not 0 <= self.resolution <= MAX_RESOLUTION:
            raise bad("resolution", f"give a number of pixels up to {MAX_RESOLUTION}, or 0 for the model's native size")
        if self.xt_model not in ("frozen", "trainable"):
            raise bad("xt_model", "choose 'frozen' or 'trainable'")
        if self.trajectories < 0:
            raise bad("trajectories", "give a number of trajectories to cache, or 0 for the per-iteration recipe")
        if self.refresh_every < 0 or (self.refresh_every and not self.trajectories):
            raise bad("refresh_every", "give a number of iterations between fresh caches, with config.trajectories > 0")
        if self.trajectories and self.xt_model == "trainable":
            raise bad(
                "trajectories", "the trained model's trajectories change every step: cache only with xt_model='frozen'"
            )
        if self.dtype not in TRAIN_DTYPES:
            raise bad(
                "dtype", f"choose one of {', '.join(TRAIN_DTYPES)}{FLOAT16_NOTE if self.dtype == 'float16' else ''}"
            )
        if self.frozen_dtype not in TRAIN_DTYPES:
            raise bad("frozen_dtype", f"choose one of {', '.join(TRAIN_DTYPES)}")
        if not self.workdir:
            raise bad("workdir", "give a folder for checkpoints and outputs")
        if self.lora_rank < 0:
            raise bad("lora_rank", "give the adapters' rank (LECO's: 4), or 0 to train the weights themselves")
        if not (0 < self.lora_alpha < FLOAT32_MAX):
            raise bad("lora_alpha", "give a finite alpha > 0; the adapters run scaled by lora_alpha / lora_rank")

    @property
    def concepts(self) -> list[str]:
        return [c.strip() for c in self.concept.split("|")] if self.concept.strip() else []

    @property
    def retains(self) -> list[str]:
        return [r.strip() for r in self.retain.split("|")] if self.retain.strip() else []

    @property
    def rows_per_erase_pair(self) -> int:
        """The training rows each erase pair brings: itself, and a retain pair where there are retain prompts."""
        return 2 if self.retains else 1

    @property
    def erase_froms(self) -> list[str]:
        """One erase-from prompt per concept, or [] without erase_from."""
        if not self.erase_from.strip():
            return []
        froms = [f.strip() for f in self.erase_from.split("|")]
        return froms * len(self.concepts) if len(froms) == 1 else froms


# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "log_every", "keep_checkpoints", "workdir")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(EraseConfig()))


def option(default, help: str, choices: tuple[str, ...] = ()):
    """A command-line option: its default, declared once, and the help text `--help` shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


# Stable Diffusion's sampling defaults (diffusers' StableDiffusionPipeline) and the embedded toy model's:
# guidance 2 to 4 lifts its shape accuracy from 0.68 to 0.83, and 5 adds nothing (docs/toy.md).
SAMPLING_DEFAULTS = {"steps": 50, "guidance": 7.5}
EMBEDDED_SAMPLING = {"steps": 25, "guidance": 4.0}
SCHEDULERS = ("ddim", "dpm++", "euler")
SAMPLE_DTYPES = ("float32", "bfloat16", "float16")


# A1111's <lora:name:strength>: 1 is the erasure as trained, 0 the base model, -1 the edit reversed.
LORA_STRENGTH_HELP = "A LoRA's (--esd file's, or a LoRA run's) strength, -1..1: 1 the erasure as trained, 0 none."


def check_sampling(cfg, counts: tuple[str, ...]) -> None:
    """What sample's and evaluate's settings share: counts (None: the model's default) of at least 1, a
    finite guidance >= 0, a 32-bit seed and a bounded number of images per prompt."""
    for key in counts:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.guidance is not None and not 0 <= cfg.guidance < FLOAT32_MAX:
        raise UserError(f"--guidance {cfg.guidance}: give a finite number >= 0 (1: no guidance)")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"--seed {cfg.seed} is outside 0..{MAX_SEED}")
    if cfg.num_per_prompt is not None and cfg.num_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise UserError(f"--num_per_prompt {cfg.num_per_prompt}: at most {MAX_IMAGES_PER_PROMPT} images per prompt")
    if not -1 <= cfg.lora_strength <= 1:
        raise UserError(f"--lora_strength {cfg.lora_strength}: give a strength from -1 to 1 (1: the erasure)")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """`esd-jax sample`: images of a prompt or a prompt CSV, from the base model or an erased one."""

    out: str | None = option(None, "Output folder; its images are kept if made from the same inputs (sample.json).")
    prompt: str | None = option(None, "One prompt (its images: OUT/0_<i>.png).")
    prompts: str | None = option(
        None, "A CSV with columns prompt, evaluation_seed, case_number (images: OUT/<case>_<i>.png)."
    )
    model: str | None = option(None, "A diffusers folder, a hub id or toy (default: the --workdir run's, else toy).")
    workdir: str | None = option(None, "Sample from this erase run's latest checkpoint.")
    esd: str | None = option(
        None, "Sample with an official-format ESD delta (.safetensors, diffusers keys) or a kohya or diffusers LoRA."
    )
    lora_strength: float = option(1.0, LORA_STRENGTH_HELP)
    steps: int | None = option(None, "Denoising steps (default: 50; the toy model's 25).")
    guidance: float | None = option(None, "Classifier-free guidance scale, 1: none (default: 7.5; the toy model's 4).")
    num_per_prompt: int = option(1, "Images per prompt.")
    seed: int = option(0, "The seed of --prompt (a CSV gives each row's evaluation_seed).")
    resolution: int = option(0, "Image side in pixels; 0: the model's native size.")
    scheduler: str = option("ddim", "DDIM, DPM-Solver++ (2M) or Euler (SDXL's default).", SCHEDULERS)
    dtype: str = option("float32", "Compute dtype.", SAMPLE_DTYPES)
    batch_size: int = option(8, "Images per compiled call, over all devices (rounded up to a multiple of them).")
    compare: bool = option(False, "Also sample the base model (OUT/base/) and write both side by side (compare.png).")

    def validate(self) -> None:
        if self.out is None:
            raise UserError("give --out FOLDER for the images: esd-jax sample --prompt TEXT --out FOLDER")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: a file, not a folder for images; pass another --out")
        if (self.prompt is None) == (self.prompts is None):
            raise UserError("give either --prompt TEXT or --prompts FILE.csv")
        if self.compare and self.workdir is None and self.esd is None:
            raise UserError("--compare needs the erased model: give --workdir RUN or --esd FILE.safetensors")
        check_sampling(self, ("num_per_prompt", "batch_size", "steps"))
        if not 0 <= self.resolution <= MAX_RESOLUTION:
            raise UserError(
                f"--resolution {self.resolution}: give a number of pixels up to {MAX_RESOLUTION}, "
                "or 0 for the native size"
            )
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.dtype not in SAMPLE_DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(SAMPLE_DTYPES)}")

    def sampling(self, model: str) -> tuple[int, float]:
        """(steps, guidance): as given, else the model's defaults."""
        return sampling_settings(self, model)


def sampling_settings(cfg, model: str) -> tuple[int, float]:
    """(steps, guidance) of a command's settings `cfg`: as given, else `model`'s defaults."""
    defaults = EMBEDDED_SAMPLING if model == EMBEDDED_NAME else SAMPLING_DEFAULTS
    return (
        defaults["steps"] if cfg.steps is None else cfg.steps,
        defaults["guidance"] if cfg.guidance is None else float(cfg.guidance),
    )


JUDGE_NAMES = ("nudenet", "classifier", "clip", "toy", "lpips", "fid")
# The judges that compare the erased model's images to the base model's instead of reading each folder alone.
PAIRWISE_JUDGES = ("lpips", "fid")
NUDENET_THRESHOLD = 0.6  # ESD's Figure 7 counted from 0.6; the other benchmarks' choices: esd_jax/judges/nudenet.py
# ESD's eval-scripts/lpips_eval.py resizes every image's shorter side to 64 pixels before LPIPS.
LPIPS_SIZE = 64
# torch-fidelity's Inception gives FID these features: 2048 (pool3) is every published FID's; the earlier layers'
# fewer features make full-rank covariances from fewer images (pytorch-fid's --dims), numbers of their own.
FID_FEATURES = (2048, 768, 192, 64)  # the first: the default
# The least side AlexNet's five convolutions read: conv1 (11, stride 4) and two 3-wide max pools need 31 pixels.
LPIPS_MIN_SIZE = 31


@dataclasses.dataclass(frozen=True)
class JudgeOptions:
    """The real-model judges' settings, which `evaluate` and `attack` share."""

    threshold: float = option(NUDENET_THRESHOLD, "nudenet: the detection score an exposed part counts above.")
    classifier: str = option("microsoft/resnet-50", "classifier: a transformers image classifier (hub id or folder).")
    clip_model: str = option("openai/clip-vit-large-patch14", "clip: a transformers CLIPModel (hub id or folder).")

    def check_threshold(self) -> None:
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold {self.threshold}: give a detection score between 0 and 1")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(JudgeOptions):
    """`esd-jax evaluate`: base against erased. Without --prompts on the toy world, judged by its oracle;
    with a prompt CSV, the images of both models (sampled into --out, or folders made elsewhere:
    --images, --base_images) judged by --judge."""

    model: str | None = option(None, "The base model (default: the --workdir run's model, else toy).")
    workdir: str | None = option(None, "The erased model: this erase run's latest checkpoint.")
    esd: str | None = option(None, "The erased model: an official-format ESD delta or a LoRA (.safetensors).")
    lora_strength: float = option(1.0, LORA_STRENGTH_HELP)
    concept: str | None = option(
        None, "The erased concept: toy: a colour, shape or style (default: the run's); else what clip/classifier ask."
    )
    json: str | None = option(None, "Also write the report to this JSON file (--prompts: default OUT/judged.json).")
    grid: str | None = option(None, "The picture (default: evaluate-<concept>.png in the workdir, else here).")
    num_per_prompt: int | None = option(None, "Images per prompt and model (default: toy 16, a prompt CSV 1).")
    steps: int | None = option(None, "Denoising steps (default: 50; the toy model's 25).")
    guidance: float | None = option(None, "Classifier-free guidance scale (default: 7.5; the toy model's 4).")
    seed: int = option(0, "Toy: image i of every prompt starts from the noise of (seed, i).")
    batch_size: int = option(64, "Images per compiled call, over all devices.")
    prompts: str | None = option(
        None, "A prompt CSV (prompt, evaluation_seed, case_number; the classifier's: class): judge its images."
    )
    judge: str | None = option(None, f"With --prompts: one or several (comma-separated) of {', '.join(JUDGE_NAMES)}.")
    out: str | None = option(None, "With --prompts: sample into this folder (the base model's in OUT/base/).")
    images: str | None = option(None, "With --prompts: judge this folder's <case>_<i>.png instead of sampling.")
    base_images: str | None = option(None, "With --images: the base model's folder, judged beside it.")
    fid_features: int = option(
        FID_FEATURES[0], "fid: Inception features per image: 2048 (published FIDs'), 768, 192 or 64."
    )
    lpips_size: int = option(LPIPS_SIZE, "lpips: resize each image's shorter side to this first, as ESD; 0: as it is.")
    scheduler: str = option("ddim", "With --prompts: the sampler.", SCHEDULERS)
    resolution: int = option(0, "With --prompts: image side in pixels; 0: the model's native size.")
    dtype: str = option("float32", "With --prompts: the sampling compute dtype.", SAMPLE_DTYPES)

    def validate(self) -> None:
        check_sampling(self, ("num_per_prompt", "steps", "batch_size"))
        if self.prompts is None:
            for key in ("judge", "out", "images", "base_images"):
                if getattr(self, key) is not None:
                    raise UserError(f"--{key} needs --prompts FILE.csv, the prompts whose images are judged")
            return
        if not self.judges or any(n not in JUDGE_NAMES for n in self.judges):
            choices = ", ".join(JUDGE_NAMES)
            raise UserError(f"--judge {self.judge!r}: give one or several (comma-separated) of {choices}")
        if (self.out is None) == (self.images is None):
            raise UserError("with --prompts give --out FOLDER (sample there) or --images FOLDER (judge those)")
        if self.base_images is not None and self.images is None:
            raise UserError("--base_images goes with --images: the folders of images made elsewhere")
        if self.images is not None and (self.workdir or self.esd or self.model):
            raise UserError("--images judges a folder as it is: leave out --model, --workdir and --esd")
        self.check_threshold()
        if self.lpips_size and self.lpips_size < LPIPS_MIN_SIZE:
            raise UserError(
                f"--lpips_size {self.lpips_size}: give 0 (the images as they are) or at least {LPIPS_MIN_SIZE} pixels, "
                "the least AlexNet reads"
            )
        if self.fid_features not in FID_FEATURES:
            choices = ", ".join(map(str, FID_FEATURES))
            raise UserError(f"--fid_features {self.fid_features}: choose one of {choices}")
        pairwise = [n for n in self.judges if n in PAIRWISE_JUDGES]
        if pairwise and self.images is not None and self.base_images is None:
            raise UserError(
                f"--judge {pairwise[0]} compares the erased images to the base model's: give --base_images FOLDER"
            )
        if pairwise and self.out is not None and self.workdir is None and self.esd is None:
            raise UserError(
                f"--judge {pairwise[0]} compares an erased model's images to the base model's: give the erased "
                "model (--workdir or --esd) to sample both, or --images with --base_images"
            )

    @property
    def judges(self) -> list[str]:
        return [n.strip() for n in (self.judge or "").split(",") if n.strip()]

    def sampling(self, model: str) -> tuple[int, float, int]:
        """(steps, guidance, images per prompt): as given, else the model's (and the mode's) defaults."""
        per_prompt = (16 if self.prompts is None else 1) if self.num_per_prompt is None else self.num_per_prompt
        return (*sampling_settings(self, model), per_prompt)


# The judges whose verdict on one image says whether it shows the concept: an attack's success.
ATTACK_JUDGES = ("toy", "nudenet", "classifier", "clip")


@dataclasses.dataclass(frozen=True)
class AttackConfig(JudgeOptions):
    """`esd-jax attack`: adversarial prompts against an erased model (UnlearnDiffAtk's attack), the
    concept's rate judged before and after it."""

    out: str | None = option(None, "Output folder: the images (base/, erased/, embedding/, token/) and the report.")
    model: str | None = option(None, "The base model (default: the --workdir run's model, else toy).")
    workdir: str | None = option(None, "The erased model: this erase run's latest checkpoint.")
    esd: str | None = option(None, "The erased model: an official-format ESD delta or a LoRA (.safetensors).")
    lora_strength: float = option(1.0, LORA_STRENGTH_HELP)
    concept: str | None = option(
        None, "The erased concept: toy: a colour, shape or style (default: the run's); clip: what it looks for."
    )
    prompts: str | None = option(
        None,
        "A prompt CSV (prompt, evaluation_seed, case_number; the classifier's: class); toy default: the concept's.",
    )
    judge: str | None = option(
        None, f"Who says an image shows the concept: one of {', '.join(ATTACK_JUDGES)} (toy's: toy)."
    )
    num_per_prompt: int | None = option(
        None, "Attacks per prompt, each on an image of its own (default: toy 4, a CSV 1)."
    )
    seed: int = option(0, "The attack's seed; toy prompts: image i starts from the noise of (seed, i).")
    tokens: int = option(5, "Tokens of the adversarial prefix (UnlearnDiffAtk's 5).")
    attack_steps: int = option(40, "Adam steps of each attack (UnlearnDiffAtk's 40).")
    attack_lr: float = option(0.01, "Adam's learning rate in token-embedding space (UnlearnDiffAtk's 0.01).")
    draws: int = option(4, "Noisings (t, noise) of the concept image per step and attack.")
    steps: int | None = option(None, "Denoising steps of the images (default: 50; the toy model's 25).")
    guidance: float | None = option(None, "Classifier-free guidance scale (default: 7.5; the toy model's 4).")
    batch_size: int = option(16, "Attacks (and their images) per compiled call, over all devices.")

    def validate(self) -> None:
        if self.out is None:
            raise UserError("give --out FOLDER for the attack's images and report")
        if self.workdir is None and self.esd is None:
            raise UserError("give the erased model to attack: --workdir RUN or --esd FILE.safetensors")
        if self.judge is not None and self.judge not in ATTACK_JUDGES:
            raise UserError(f"--judge {self.judge!r}: choose one of {', '.join(ATTACK_JUDGES)}")
        for key in ("tokens", "attack_steps", "draws", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.attack_lr < FLOAT32_MAX:
            raise UserError(f"--attack_lr {self.attack_lr}: give a positive finite learning rate")
        check_sampling(self, ("num_per_prompt", "steps"))
        self.check_threshold()

    def sampling(self, model: str) -> tuple[int, float, int]:
        """(steps, guidance, attacks per prompt): as given, else the model's (and the mode's) defaults."""
        per_prompt = (4 if self.prompts is None else 1) if self.num_per_prompt is None else self.num_per_prompt
        return (*sampling_settings(self, model), per_prompt)
