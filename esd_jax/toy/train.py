"""Trains the toy pipeline from scratch: first the VAE on world images, then the UNet and text encoder on its latents.

    python scripts/train_toy.py --workdir runs/toy --minutes 90

Each invocation trains for at most `minutes`, checkpoints (Orbax, `<workdir>/<stage>/checkpoints`) and
exports the EMA weights as a diffusers folder; rerunning the same command continues where it stopped and
ends with the same weights as one uninterrupted run (data, noise and dropout come from (seed, step)).
Both stages run the same compiled step; they differ only in their loss and in which networks train.
"""

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from esd_jax import checkpoints, run
from esd_jax.errors import UserError
from esd_jax.metrics import MetricsLog, plot_loss
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import NoiseSchedule
from esd_jax.toy import world
from esd_jax.toy.model import SCHEDULER, Networks, ToyModel, build, set_scaling_factor


@dataclasses.dataclass(frozen=True)
class TrainToyConfig:
    """Every setting of a toy training run; the defaults train the shipped model.

    The UNet stage follows that first experiment (esd_jax/toy/model.py) except for two settings that learn
    the shapes in about half the steps: a learning rate of 1e-3 rather than 5e-4, and min-SNR loss weighting."""

    seed: int = 0
    model: ToyModel = ToyModel()
    # Stage 1, the VAE: flat shapes on flat or regular backgrounds reconstruct within minutes.
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_learning_rate: float = 1e-3
    # A light KL term: the latents stay close to a unit Gaussian in shape, reconstructions stay sharp.
    kl_weight: float = 1e-4
    # Stage 2, the UNet and the text encoder, trained together: a frozen random text encoder gives nearly
    # equal embeddings to different captions (cosine 0.90-0.97) and the UNet then confuses them.
    unet_steps: int = 3000  # the first multiple of 500 whose EMA weights pass the quality gate
    batch: int = 64
    learning_rate: float = 1e-3
    # Min-SNR-gamma loss weighting (Hang et al., ICCV 2023), as diffusers' --snr_gamma; 0 turns it off.
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # for classifier-free guidance
    # Both stages.
    warmup_steps: int = 200
    weight_decay: float = 0.01  # PyTorch AdamW's default, which the experiment used
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 10

    def __post_init__(self):
        for key in ("vae_steps", "vae_batch", "unet_steps", "batch", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, not {getattr(self, key)}")
        if self.snr_gamma < 0:
            raise UserError(f"snr_gamma must be 0 (off) or positive, not {self.snr_gamma}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), not {self.caption_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings a resumed run may change: the length of stage 2 and the bookkeeping.
RESUMABLE_CHANGES = ("unet_steps", "checkpoint_every", "log_every")
# Which networks train in each stage (the first element of a parameter's path).
TRAINS = {"vae": ("vae",), "unet": ("unet", "text_encoder")}
STAGE_SEED = {"vae": 1, "unet": 2}  # folded into the data seed so the stages see different images
ALPHAS_CUMPROD = NoiseSchedule.from_config(SCHEDULER).alphas_cumprod


@dataclasses.dataclass(frozen=True)
class Stage:
    """What the compiled step needs to know about its stage; hashable, so it is a static argument."""

    name: str  # a key of TRAINS and LOSSES
    graphdef: Any
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    ema_decay: float
    kl_weight: float = 0.0
    caption_dropout: float = 0.0
    snr_gamma: float = 0.0
    scaling_factor: float = 1.0
    null_ids: tuple[int, ...] = ()  # the token ids of "", which replace a dropped caption


@dataclasses.dataclass
class ToyState:
    step: jax.Array
    trainable: Any  # nnx.State of the stage's trained parameters
    ema: Any  # their exponential moving average: what is exported
    opt_state: Any
    rng: jax.Array


jax.tree_util.register_dataclass(ToyState, data_fields=["step", "trainable", "ema", "opt_state", "rng"], meta_fields=[])


@functools.partial(jax.jit, static_argnames=("stage", "seed"))
def initial_state(trainable, stage: Stage, seed: int) -> ToyState:
    """Step 0; one compiled program (run eagerly, each parameter shape would compile its own copies and zeros)."""
    return ToyState(
        step=jnp.int32(0),
        trainable=trainable,
        ema=jax.tree.map(jnp.copy, trainable),
        opt_state=optimizer(stage).init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def optimizer(stage: Stage) -> optax.GradientTransformation:
    lr = optax.warmup_constant_schedule(0.0, stage.learning_rate, stage.warmup_steps)
    return optax.chain(optax.clip_by_global_norm(stage.grad_clip), optax.adamw(lr, weight_decay=stage.weight_decay))


def vae_loss(net: Networks, batch: dict, key: jax.Array, stage: Stage):
    """Reconstruction MSE of a posterior sample plus a light KL to the unit Gaussian (per latent element)."""
    images = batch["images"]  # [B, 3, 32, 32]
    mean, logvar = net.vae.encode(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    mse = jnp.mean(jnp.square(net.vae.decode(z) - images))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return mse + stage.kl_weight * kl, {"mse": mse, "kl": kl}


def min_snr_weights(t: jax.Array, gamma: float) -> jax.Array:
    """min(SNR_t, gamma) / SNR_t per timestep, SNR_t = alpha_bar_t / (1 - alpha_bar_t); 1 everywhere when gamma is 0.

    It keeps the low-noise timesteps (SNR above gamma: the first 147 of Stable Diffusion's 1000) from
    dominating the gradient; with it the toy UNet learns the world's shapes in less than half the steps."""
    if not gamma:
        return jnp.ones(t.shape, jnp.float32)
    alpha = jnp.asarray(ALPHAS_CUMPROD)[t]
    snr = alpha / (1 - alpha)
    return jnp.minimum(snr, gamma) / snr


def unet_loss(net: Networks, batch: dict, key: jax.Array, stage: Stage):
    """Stable Diffusion's objective: predict the noise added to the scaled latents at a uniform timestep,
    each sample's squared error weighted by min-SNR."""
    k_latent, k_t, k_noise, k_drop = jax.random.split(key, 4)
    mean, logvar = net.vae.encode(batch["images"])
    z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)) * stage.scaling_factor
    b = z.shape[0]
    t = jax.random.randint(k_t, (b,), 0, len(ALPHAS_CUMPROD))
    noise = jax.random.normal(k_noise, z.shape)
    alpha = jnp.asarray(ALPHAS_CUMPROD)[t][:, None, None, None]
    x_t = jnp.sqrt(alpha) * jax.lax.stop_gradient(z) + jnp.sqrt(1 - alpha) * noise
    drop = jax.random.bernoulli(k_drop, stage.caption_dropout, (b,))
    ids = jnp.where(drop[:, None], jnp.asarray(stage.null_ids, jnp.int32), batch["ids"])  # [B, L]
    pred = net.unet(x_t, t, net.text_encoder(ids))
    mse = jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3))
    return jnp.mean(min_snr_weights(t, stage.snr_gamma) * mse), {"mse": jnp.mean(mse)}


LOSSES = {"vae": vae_loss, "unet": unet_loss}


@functools.partial(jax.jit, static_argnames=("stage",), donate_argnames=("state",))
def train_step(state: ToyState, frozen, batch: dict, stage: Stage):
    """One optimizer step of either stage: loss, gradient clipping, AdamW, EMA; (state, metrics)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(trainable):
        return LOSSES[stage.name](nnx.merge(stage.graphdef, trainable, frozen), batch, key, stage)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = optimizer(stage).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # diffusers' EMAModel warm-up: early averages do not drag in the random initialisation.
    decay = jnp.minimum(stage.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, trainable)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
    return ToyState(state.step + 1, trainable, ema, opt_state, state.rng), metrics


class Captions:
    """Token ids of every caption the world writes, tokenized once as the pipeline will: padded to max length."""

    def __init__(self, pipe: StableDiffusion):
        texts = ["", *world.all_captions()]
        self.ids = pipe.token_ids(texts)  # [captions, L]
        self.row = {t: i for i, t in enumerate(texts)}

    def __call__(self, captions: list[str]) -> np.ndarray:
        return self.ids[[self.row[c] for c in captions]]


def host_batch(name: str, seed: int, step: int, size: int, captions: Captions) -> dict[str, np.ndarray]:
    b = world.sample(size, (seed, STAGE_SEED[name], step))
    return {"images": b.images, "ids": captions(b.captions)}


def run_stage(
    stage: Stage,
    net: Networks,
    cfg: TrainToyConfig,
    steps: int,
    batch: int,
    captions: Captions,
    workdir: Path,
    deadline: float,
    stop: run.StopSignal,
) -> ToyState:
    """Restores the stage's latest checkpoint, trains it to `steps` or the deadline, checkpoints; its state."""
    trains = TRAINS[stage.name]
    graphdef, trainable, frozen = nnx.split(net, lambda path, x: path[0] in trains, ...)
    stage = dataclasses.replace(stage, graphdef=graphdef)
    state = initial_state(trainable, stage, cfg.seed)
    folder = workdir / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    manager = checkpoints.open_manager(folder, every=cfg.checkpoint_every, keep=2)
    # Committed to one device, as restored arrays are: a fresh and a resumed run then share one compiled step.
    state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    if manager.latest_step() is not None:
        state = checkpoints.restore(manager, state)
    start = int(state.step)
    if start >= steps or time.time() >= deadline or stop.received:
        manager.close()
        return state

    log = MetricsLog(folder / "metrics.jsonl", start)
    bar = tqdm(total=steps, initial=start, desc=f"{stage.name} stage", unit="step", dynamic_ncols=True)
    pending, began = [], time.perf_counter()

    def flush(step: int) -> None:
        """Writes the pending steps' metrics: one device-to-host transfer per log interval."""
        nonlocal pending, began
        rows = jax.device_get(pending)
        seconds = (time.perf_counter() - began) / len(rows)
        for i, row in enumerate(rows):
            row, at = {k: float(v) for k, v in row.items()}, step - len(rows) + i + 1
            if not np.isfinite(row["loss"]):
                raise UserError(
                    f"{stage.name} stage: the loss became {row['loss']} at step {at}; the last good "
                    f"checkpoint is step {manager.latest_step()}: lower the learning rate"
                )
            log.write({"step": at, **row, "seconds": seconds})
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", s_per_step=f"{seconds:.2f}")
        bar.update(len(rows))
        pending, began = [], time.perf_counter()

    step = start
    try:
        while step < steps and time.time() < deadline and not stop.received:
            data = host_batch(stage.name, cfg.seed, step, batch, captions)
            state, metrics = train_step(state, frozen, data, stage)
            step += 1
            pending.append(metrics)
            if len(pending) == cfg.log_every:
                flush(step)
            checkpoints.save(manager, state)
        if pending:
            flush(step)
        if manager.latest_step() != step:
            checkpoints.save(manager, state, force=True)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        ylabel = "VAE loss (MSE + KL)" if stage.name == "vae" else "noise-prediction MSE"
        ylabel += ", min-SNR weighted" if stage.snr_gamma else ""
        plot_loss(folder / "metrics.jsonl", folder / "loss.png", f"toy {stage.name} stage", ylabel=ylabel)
    return state


def common_stage(cfg: TrainToyConfig) -> dict[str, Any]:
    """The Stage fields both stages take from the config (graphdef is filled in by run_stage)."""
    return dict(graphdef=None, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)


def unet_stage(cfg: TrainToyConfig, captions: Captions, scaling_factor: float) -> Stage:
    return Stage(
        "unet",
        learning_rate=cfg.learning_rate,
        ema_decay=cfg.ema_decay,
        caption_dropout=cfg.caption_dropout,
        snr_gamma=cfg.snr_gamma,
        scaling_factor=scaling_factor,
        null_ids=tuple(int(i) for i in captions([""])[0]),
        **common_stage(cfg),
    )


def latent_scale(vae, seed: int) -> float:
    """1 / std of the VAE's latents over 256 world images (262144 numbers): the `scaling_factor` that gives
    them unit variance, as Stable Diffusion's 0.18215 does for its VAE."""
    images = world.sample(256, (seed, 0)).images
    mean, logvar = nnx.jit(lambda v, x: v.encode(x))(vae, images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(seed), mean.shape)
    return float(1.0 / jnp.std(z))


def train(cfg: TrainToyConfig, workdir: Path, minutes: float, export: Path | None = None) -> Path | None:
    """Trains (or continues) for at most `minutes`, then exports the EMA pipeline; its folder, or None
    while the UNet stage has not started. `export` defaults to `<workdir>/pipeline`."""
    workdir = Path(workdir).absolute()
    with run.locked(workdir):
        settings = json.loads(json.dumps(cfg.to_dict()))
        run.check_same_run(workdir, settings, RESUMABLE_CHANGES)
        run.write_settings(workdir, settings)
        return train_locked(cfg, workdir, minutes, export)


def train_locked(cfg: TrainToyConfig, workdir: Path, minutes: float, export: Path | None) -> Path | None:
    deadline = time.time() + 60 * minutes
    pipe = build(cfg.model, cfg.seed)
    net = Networks(pipe)
    captions = Captions(pipe)
    stop = run.StopSignal()
    try:
        vae_stage = Stage(
            "vae",
            learning_rate=cfg.vae_learning_rate,
            ema_decay=cfg.ema_decay,
            kl_weight=cfg.kl_weight,
            **common_stage(cfg),
        )
        state = run_stage(vae_stage, net, cfg, cfg.vae_steps, cfg.vae_batch, captions, workdir, deadline, stop)
        if int(state.step) < cfg.vae_steps:
            print(f"VAE stage at step {int(state.step)} of {cfg.vae_steps}; the same command continues")
            return None
        nnx.update(net, state.ema)
        scale_file = workdir / "vae" / "scaling_factor.json"
        if not scale_file.exists():
            scale_file.write_text(json.dumps({"scaling_factor": latent_scale(net.vae, cfg.seed)}) + "\n")
        scaling_factor = json.loads(scale_file.read_text())["scaling_factor"]

        state = run_stage(
            unet_stage(cfg, captions, scaling_factor),
            net,
            cfg,
            cfg.unet_steps,
            cfg.batch,
            captions,
            workdir,
            deadline,
            stop,
        )
    finally:
        stop.restore()
    if int(state.step) == 0:
        return None
    nnx.update(net, state.ema)
    set_scaling_factor(pipe, scaling_factor)
    out = Path(export) if export is not None else workdir / "pipeline"
    pipe.save_pretrained(out)
    done = int(state.step) >= cfg.unet_steps
    print(f"UNet stage at step {int(state.step)} of {cfg.unet_steps}; EMA pipeline written to {out}")
    if not done:
        print("the same command continues the run")
    return out
