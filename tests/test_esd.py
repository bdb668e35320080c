"""The ESD objective against PyTorch diffusers on the same weights, and the data-parallel step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import DDIMScheduler
from flax import nnx
from jax.sharding import Mesh

import esd_jax
from conftest import perturb
from esd_jax import parallel, weights
from esd_jax.conditioning import concat, take
from esd_jax.esd import Objective, Prompts, TrainState, esd_loss, esd_target, make_train_step, partial_sample
from esd_jax.partition import trainable_filter, trainable_keys
from esd_jax.schedulers import NoiseSchedule


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def objective(**overrides) -> Objective:
    return Objective(
        **{
            **dict(
                negative_guidance=1.5,
                start_guidance=3.0,
                ddim_steps=5,
                xt_model="frozen",
                latent_shape=(4, 8, 8),
                erase_from=False,
            ),
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from conftest import build_torch_pipeline

    ref = build_torch_pipeline("sd1")
    folder = tmp_path_factory.mktemp("esd-sd1")
    ref.save_pretrained(folder)
    return folder, ref, esd_jax.load_pipeline(folder)


def torch_embeds(ref, prompts: list[str]) -> torch.Tensor:
    ids = ref.tokenizer(
        prompts, padding="max_length", max_length=ref.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return ref.text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("erase_from", [False, True])
def test_target_and_loss_match_a_pytorch_computation(sd1, erase_from):
    folder, ref, pipe = sd1
    eta = 1.5
    c, f, null = torch_embeds(ref, ["red circle", "a photo of green", ""])
    rng = np.random.default_rng(0)
    x_t = torch.tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    t = torch.tensor([981, 401])
    # The trainable copy differs from the original in its cross-attention weights, as after some steps.
    esd_unet = type(ref.unet).from_pretrained(folder / "unet")
    perturb(torch.nn.ModuleList([m for n, m in esd_unet.named_modules() if n.endswith("attn2")]), seed=7)
    cond = torch.stack([f, f]) if erase_from else torch.stack([c, c])
    with torch.no_grad():
        e_0 = ref.unet(x_t, t, torch.stack([null, null])).sample
        e_c = ref.unet(x_t, t, torch.stack([c, c])).sample
        e_base = ref.unet(x_t, t, cond).sample if erase_from else e_0
        target = e_base - eta * (e_c - e_0)
        loss = torch.nn.functional.mse_loss(esd_unet(x_t, t, cond).sample, target)

    graphdef = nnx.graphdef(pipe.unet)
    ours = objective(negative_guidance=eta, erase_from=erase_from)
    emb = encode_prompts(pipe, ["red circle", "a photo of green", ""])
    jc, jf, jnull = emb[jnp.array([0, 0])], emb[jnp.array([1, 1])], emb[2]
    got_target = esd_target(
        pipe.unet, ours, jnp.asarray(x_t.numpy()), jnp.asarray(t.numpy()), jc, jf if erase_from else jc, jnull
    )
    assert rel_err(got_target, target.numpy()) <= 1e-4

    keys = trainable_keys(pipe.unet, "esd-x")
    trained = {k: v.numpy() for k, v in esd_unet.state_dict().items() if k in keys}
    esd = esd_jax.load_pipeline(folder).unet  # a separate copy: NNX modules share arrays through split/merge
    weights.load_state_dict(esd, {**weights.state_dict(esd), **trained}, source="test")
    _, trainable, frozen = nnx.split(esd, trainable_filter(esd, "esd-x"), ...)
    got_loss = esd_loss(
        trainable,
        trainable,  # a full-weight model's trained weights are the trainable ones: no originals used
        frozen,
        graphdef,
        jnp.asarray(x_t.numpy()),
        jnp.asarray(t.numpy()),
        jf if erase_from else jc,
        jnp.asarray(target.numpy()),
    )
    assert abs(float(got_loss) - loss.item()) / loss.item() <= 1e-4


def test_partial_ddim_matches_diffusers_stepping(sd1):
    """x_t after k guided DDIM steps equals the diffusers pipeline's latents after k steps, per sample."""
    _, ref, pipe = sd1
    steps, guidance, ks = 5, 3.0, [0, 3]
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    captured = {}

    def capture(p, i, t, kwargs):
        captured[i + 1] = kwargs["latents"].clone()
        return kwargs

    scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref_pipe = type(ref)(**{**ref.components, "scheduler": scheduler})
    ref_pipe(
        ["red circle"] * 2,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.tensor(noise),
        output_type="latent",
        callback_on_step_end=capture,
    )
    captured[0] = torch.tensor(noise)

    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    emb = encode_prompts(pipe, ["red circle", ""])
    x_t = partial_sample(
        pipe.unet,
        schedule,
        objective(ddim_steps=steps, start_guidance=guidance),
        jnp.asarray(noise),
        jnp.asarray(ks),
        emb[jnp.array([0, 0])],
        emb[1],
    )
    for b, k in enumerate(ks):
        assert rel_err(x_t[b], captured[k][b].numpy()) <= 1e-4, k


def test_the_sampling_loops_last_turn_gives_the_targets_predictions(sd1):
    """partial_sample(predictions=True): x_t as without, and at x_t the two frozen predictions that
    esd_target's own call makes, per sample, each at its own k."""
    _, _, pipe = sd1
    schedule, obj = NoiseSchedule.from_config(pipe.scheduler_config), objective(ddim_steps=6)
    emb = encode_prompts(pipe, ["red circle", ""])
    cond = emb[jnp.array([0, 0, 0])]
    noise = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4, 8, 8)), jnp.float32)
    k = jnp.asarray([0, 4, 5])
    x_t, e_0, e_c = partial_sample(pipe.unet, schedule, obj, noise, k, cond, emb[1], predictions=True)
    assert rel_err(x_t, partial_sample(pipe.unet, schedule, obj, noise, k, cond, emb[1])) <= 1e-6
    t = jnp.asarray(schedule.timesteps(obj.ddim_steps))[k]
    want = esd_target(pipe.unet, obj, x_t, t, cond, cond, emb[1])
    assert rel_err(e_0 - obj.negative_guidance * (e_c - e_0), want) <= 1e-5


class Encoded:
    """Prompts' conditioning (esd_jax.conditioning) indexed as an array of rows: emb[i] is prompt i's."""

    def __init__(self, cond):
        self.cond = cond

    def __getitem__(self, index):
        return jax.tree.map(lambda x: x[index], self.cond)


def encode_prompts(pipe, texts: list[str]) -> Encoded:
    return Encoded(pipe.encode(texts))


def run_steps(
    pipe,
    mesh: Mesh,
    batch_per_device: int,
    steps: int = 2,
    xt_model: str = "frozen",
    optimizer: optax.GradientTransformation | None = None,
):
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; the fixture's model keeps its own
    original = jax.tree.map(jnp.copy, trainable)
    optimizer = optimizer or optax.adam(1e-3)
    emb = encode_prompts(pipe, ["red circle", "van gogh", "a photo of green", ""])
    prompts = Prompts(concept=emb[:2], erase_from=emb[jnp.array([2, 2])], null=emb[3])
    state = TrainState(
        step=jnp.int32(0),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = make_train_step(
        graphdef,
        NoiseSchedule.from_config(pipe.scheduler_config),
        objective(erase_from=True, xt_model=xt_model),
        optimizer,
        mesh,
        batch_per_device,
    )
    state, frozen, original, prompts = parallel.place((state, frozen, original, prompts), mesh)
    losses = []
    with jax.transfer_guard("disallow"):  # as in the erase loop: the step's arrays all live on the devices
        for _ in range(steps):
            state, metrics = step(state, frozen, original, prompts)
            losses.append(float(jax.device_get(metrics["loss"])))
    return losses, state, frozen, metrics


def test_one_device_and_four_give_the_same_loss_and_update(sd1):
    _, _, pipe = sd1
    assert jax.device_count() >= 4, "conftest asks XLA for 4 CPU devices"
    # Plain SGD, so the update is the averaged gradient itself (Adam's normalisation would turn
    # summation-order noise in near-zero gradients into full-size differences).
    sgd = optax.sgd(1.0)
    one, state1, _, m1 = run_steps(pipe, Mesh(np.asarray(jax.devices()[:1]), ("data",)), 4, optimizer=sgd)
    four, state4, _, m4 = run_steps(pipe, Mesh(np.asarray(jax.devices()[:4]), ("data",)), 1, optimizer=sgd)
    np.testing.assert_array_equal(m1["k"], m4["k"])
    np.testing.assert_allclose(one, four, rtol=1e-5)
    _, original, _ = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    leaves = (jax.tree.leaves(state1.trainable), jax.tree.leaves(state4.trainable), jax.tree.leaves(original))
    for a, b, o in zip(*leaves, strict=True):
        update1, update4 = np.asarray(a) - np.asarray(o), np.asarray(b) - np.asarray(o)
        assert np.abs(update1).max() > 0
        rounding = 2 * np.spacing(np.abs(np.asarray(o)).max())  # of adding a small update to the weights
        assert np.abs(update1 - update4).max() <= 1e-4 * np.abs(update1).max() + rounding


@pytest.mark.parametrize("xt_model", ["frozen", "trainable"])
def test_training_moves_trainable_weights_only(sd1, xt_model):
    _, _, pipe = sd1
    before = weights.state_dict(pipe.unet)
    _, state, frozen, _ = run_steps(pipe, Mesh(np.asarray(jax.devices()[:2]), ("data",)), 1, xt_model=xt_model)
    graphdef = nnx.graphdef(pipe.unet)
    after = weights.state_dict(nnx.merge(graphdef, state.trainable, frozen))
    keys = trainable_keys(pipe.unet, "esd-x")
    for key, value in before.items():
        if key in keys:
            assert not np.array_equal(after[key], value), key
        else:
            assert np.array_equal(after[key], value), key


def test_the_step_traces_once_and_moves_no_data_implicitly(sd1, monkeypatch):
    """Three steps of the compiled step: one trace, and (run_steps' guard, as the erase loop's) no implicit
    host <-> device copy."""
    import chex

    from esd_jax import esd

    _, _, pipe = sd1
    monkeypatch.setattr(esd, "local_pairs", chex.assert_max_traces(esd.local_pairs, n=1))
    losses, *_ = run_steps(pipe, Mesh(np.asarray(jax.devices()[:4]), ("data",)), 1, steps=3)
    assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize("erase_from", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cached_pairs_equal_what_the_recipe_computes(sd1, erase_from):
    """The fast mode's pair (x_k, target_k) of trajectory j equals the per-iteration recipe's x_t after k
    guided steps from the same noise, and its target there (partial_sample and esd_target)."""
    from esd_jax.trajectories import make_trajectory_sampler, trajectory_draws

    _, _, pipe = sd1
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    emb = encode_prompts(pipe, ["red circle", "van gogh", "a photo of green", ""])
    prompts = Prompts(concept=emb[:2], erase_from=emb[jnp.array([2, 2])] if erase_from else None, null=emb[3])
    obj = objective(erase_from=erase_from)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    rng = jax.random.key_data(jax.random.key(7))
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    cache = make_trajectory_sampler(graphdef, schedule, obj, mesh, count=3)(trainable, frozen, prompts, rng)
    assert cache.x_t.shape == (4, obj.ddim_steps, *obj.latent_shape)  # padded to the 4 devices
    concept, noise_keys = trajectory_draws(rng, 4, 2)
    np.testing.assert_array_equal(cache.prompt, concept)
    unet = nnx.merge(graphdef, trainable, frozen)
    timesteps = jnp.asarray(schedule.timesteps(obj.ddim_steps))
    for j in range(3):
        noise = jax.random.normal(noise_keys[j], obj.latent_shape)[None]
        c = take(prompts.concept, concept[j][None])
        f = take(prompts.erase_from, concept[j][None]) if erase_from else c
        for k in (0, 2, obj.ddim_steps - 1):
            x_t = partial_sample(unet, schedule, obj, noise, jnp.asarray([k]), f, prompts.null)
            target = esd_target(unet, obj, x_t, timesteps[k][None], c, f, prompts.null)
            assert rel_err(cache.x_t[j, k], x_t[0]) <= 1e-5, (j, k)
            assert rel_err(cache.target[j, k], target[0]) <= 1e-5, (j, k)


def test_fresh_caches_hold_the_next_trajectories_and_each_draws_its_own_pairs(sd1):
    """With refresh_every, cache g holds trajectories g T ... (g + 1) T - 1 of the one stream, and the
    steps of each cache draw distinct pairs of it, in an order of their own."""
    from esd_jax.esd import caches_in, pair_draws
    from esd_jax.trajectories import make_trajectory_sampler

    _, _, pipe = sd1
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    emb = encode_prompts(pipe, ["red circle", "van gogh", ""])
    prompts = Prompts(concept=emb[:2], erase_from=None, null=emb[2])
    obj, schedule = objective(), NoiseSchedule.from_config(pipe.scheduler_config)
    rng = jax.random.key_data(jax.random.key(3))
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    second = make_trajectory_sampler(graphdef, schedule, obj, mesh, count=2)(trainable, frozen, prompts, rng, 1)
    both = make_trajectory_sampler(graphdef, schedule, obj, mesh, count=4)(trainable, frozen, prompts, rng)
    np.testing.assert_array_equal(second.prompt, both.prompt[2:])
    # Batches of 2 against 4: equal up to the kernels' rounding.
    assert rel_err(second.x_t, both.x_t[2:]) <= 1e-5 and rel_err(second.target, both.target[2:]) <= 1e-5

    def pairs(steps):
        drawn = [pair_draws(rng, jnp.int32(s), 3, 5, 4, refresh_every=3) for s in steps]
        return [(int(j), int(k)) for js, ks in drawn for j, k in zip(js, ks, strict=True)]

    first, next_ = pairs(range(3)), pairs(range(3, 6))  # a cache per 3 steps of 4 pairs: 12 of its 15
    assert [caches_in(n, 3) for n in (1, 3, 4, 6, 7)] == [1, 1, 2, 2, 3] and caches_in(7, 0) == 1
    assert len(set(first)) == len(set(next_)) == 12
    assert first != next_ and all(j < 3 and k < 5 for j, k in first + next_)


def test_cached_steps_draw_distinct_pairs_and_agree_across_device_counts(sd1):
    from esd_jax.esd import pair_draws
    from esd_jax.trajectories import make_trajectory_sampler

    rng = jax.random.key_data(jax.random.key(0))
    drawn = [pair_draws(rng, jnp.int32(s), 3, 5, 4) for s in range(3)]  # 15 pairs, 3 steps of 4 an epoch
    pairs = {(int(j), int(k)) for js, ks in drawn for j, k in zip(js, ks, strict=True)}
    assert len(pairs) == 12 and all(j < 3 and k < 5 for j, k in pairs)

    _, _, pipe = sd1
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    emb = encode_prompts(pipe, ["red circle", "van gogh", ""])
    prompts = Prompts(concept=emb[:2], erase_from=None, null=emb[2])
    obj = objective()
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    optimizer = optax.sgd(1.0)
    losses = []
    for devices, per_device in ((1, 4), (4, 1)):
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
        cache = make_trajectory_sampler(graphdef, schedule, obj, mesh, count=3)(trainable, frozen, prompts, rng)
        step = make_train_step(graphdef, schedule, obj, optimizer, mesh, per_device, trajectories=3)
        params = jax.tree.map(jnp.copy, trainable)
        state = TrainState(jnp.int32(0), params, optimizer.init(params), jnp.copy(rng))  # the step donates it
        state, frozen_m, prompts_m, cache = parallel.place((state, frozen, prompts, cache), mesh)
        run = []
        for _ in range(2):
            state, metrics = step(state, frozen_m, None, prompts_m, cache)
            run.append(float(jax.device_get(metrics["loss"])))
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def retain_setup(pipe, erase_from: bool = False):
    """The sd1 fixture's UNet split for esd-x, and its prompts without and with two retain prompts."""
    graphdef, trainable, frozen = nnx.split(pipe.unet, trainable_filter(pipe.unet, "esd-x"), ...)
    emb = encode_prompts(pipe, ["red circle", "van gogh", "a photo of green", "", "a blue square", "a cat"])
    plain = Prompts(concept=emb[:2], erase_from=emb[jnp.array([2, 2])] if erase_from else None, null=emb[3])
    return graphdef, trainable, frozen, plain, dataclasses.replace(plain, retain=emb[4:])


def halves(rows, devices: int):
    """(erase rows, retain rows) of interleaved rows: the halves of every device's block."""
    blocks = jnp.asarray(rows).reshape(devices, 2, -1, *rows.shape[1:])
    return tuple(blocks[:, i].reshape(-1, *rows.shape[1:]) for i in range(2))


def erase_rows(rows, devices: int):
    return halves(rows, devices)[0]


def retain_rows(rows, devices: int):
    return halves(rows, devices)[1]


@pytest.mark.parametrize("erase_from", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_retain_pairs_hold_the_frozen_prediction_under_their_prompt_and_leave_the_erase_pairs(sd1, erase_from):
    """The recipe's step with retain prompts: every device's erase rows are those of the step without them,
    and its retain rows are x_t sampled under a retain prompt from retain_key's draws, with the frozen
    model's own prediction there (one UNet call, not the ESD target) as their target."""
    from esd_jax.esd import retain_key, sample_draws

    _, _, pipe = sd1
    graphdef, trainable, frozen, plain, kept = retain_setup(pipe, erase_from)
    obj, sgd = objective(erase_from=erase_from), optax.sgd(1.0)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    mesh, devices, per_device = Mesh(np.asarray(jax.devices()[:2]), ("data",)), 2, 2
    state = TrainState(jnp.int32(3), trainable, sgd.init(trainable), jax.random.key_data(jax.random.key(5)))
    step = make_train_step(graphdef, schedule, obj, sgd, mesh, per_device)
    inputs = parallel.place((state, frozen, trainable, plain, kept), mesh)
    without = step.pairs(*inputs[:4])
    with_retain = step.pairs(*inputs[:3], inputs[4])
    assert with_retain.x_t.shape[0] == 2 * devices * per_device
    assert rel_err(erase_rows(with_retain.x_t, devices), without.x_t) <= 1e-5
    assert rel_err(erase_rows(with_retain.target, devices), without.target) <= 1e-5
    k, prompt, noise_keys = sample_draws(retain_key(state.rng), state.step, devices * per_device, obj.ddim_steps, 2)
    np.testing.assert_array_equal(retain_rows(with_retain.prompt, devices), prompt + 2)
    unet = nnx.merge(graphdef, trainable, frozen)
    r = take(kept.retain, prompt)
    noise = jax.vmap(lambda key: jax.random.normal(key, obj.latent_shape))(noise_keys)
    x_t = partial_sample(unet, schedule, obj, noise, k, r, kept.null)
    target = unet(x_t, jnp.asarray(schedule.timesteps(obj.ddim_steps))[k], **r)
    assert rel_err(retain_rows(with_retain.x_t, devices), x_t) <= 1e-5
    assert rel_err(retain_rows(with_retain.target, devices), target) <= 1e-5


def test_the_cache_holds_retain_trajectories_after_the_erase_ones(sd1):
    """The fast mode with retain prompts: the erase trajectories as without them, then as many under the
    retain prompts (from retain_key), each step's target the frozen model's prediction under its prompt."""
    from esd_jax.esd import retain_key
    from esd_jax.trajectories import make_trajectory_sampler, trajectory_draws

    _, _, pipe = sd1
    graphdef, trainable, frozen, plain, kept = retain_setup(pipe)
    obj, schedule = objective(), NoiseSchedule.from_config(pipe.scheduler_config)
    rng = jax.random.key_data(jax.random.key(7))
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sampler = make_trajectory_sampler(graphdef, schedule, obj, mesh, count=3)
    without, cache = sampler(trainable, frozen, plain, rng), sampler(trainable, frozen, kept, rng)
    assert cache.x_t.shape == (8, obj.ddim_steps, *obj.latent_shape)  # 3 of each, padded to the 4 devices
    assert rel_err(cache.x_t[:4], without.x_t) <= 1e-5 and rel_err(cache.target[:4], without.target) <= 1e-5
    prompt, noise_keys = trajectory_draws(retain_key(rng), 4, 2)
    np.testing.assert_array_equal(cache.prompt[4:], prompt + 2)
    # Trajectories 0..2 at their first and last step, in one batch.
    j, k = jnp.repeat(jnp.arange(3), 2), jnp.tile(jnp.asarray([0, obj.ddim_steps - 1]), 3)
    unet = nnx.merge(graphdef, trainable, frozen)
    r = take(kept.retain, prompt[j])
    noise = jax.vmap(lambda key: jax.random.normal(key, obj.latent_shape))(noise_keys[j])
    x_t = partial_sample(unet, schedule, obj, noise, k, r, kept.null)
    target = unet(x_t, jnp.asarray(schedule.timesteps(obj.ddim_steps))[k], **r)
    assert rel_err(cache.x_t[4 + j, k], x_t) <= 1e-5 and rel_err(cache.target[4 + j, k], target) <= 1e-5


def test_the_retain_loss_adds_its_weighted_gradient(sd1):
    """One SGD step with retain prompts (weight 0.5) from trained weights off the frozen model's, 2 devices
    of 2 rows: the logged losses are the erase rows' and the retain rows' mean squared errors over all
    devices, recomputed here from the pairs, and the update is minus the gradient of ESD + 0.5 x retain."""
    _, _, pipe = sd1
    graphdef, original, frozen, _, kept = retain_setup(pipe)
    # Off the originals, so that the retain loss is not 0.
    leaves, tree = jax.tree.flatten(original)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = [x + 0.05 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys, strict=True)]
    trainable = jax.tree.unflatten(tree, moved)
    obj, schedule, sgd = objective(), NoiseSchedule.from_config(pipe.scheduler_config), optax.sgd(1.0)
    timesteps = jnp.asarray(schedule.timesteps(obj.ddim_steps))
    mesh, devices = Mesh(np.asarray(jax.devices()[:2]), ("data",)), 2
    params = jax.tree.map(jnp.copy, trainable)  # the step donates it
    state = TrainState(jnp.int32(0), params, sgd.init(params), jax.random.key_data(jax.random.key(1)))
    step = make_train_step(graphdef, schedule, obj, sgd, mesh, 2, retain_weight=0.5)
    state, frozen_m, original_m, prompts = parallel.place((state, frozen, original, kept), mesh)
    pairs = step.pairs(state, frozen_m, original_m, prompts)
    state, metrics = step.update(state, frozen_m, original_m, prompts, pairs)
    pairs, metrics, after = jax.device_get((pairs, metrics, state.trainable))
    cond = take(concat([kept.concept, kept.retain]), pairs.prompt)
    e_args = (pairs.x_t, timesteps[pairs.k])

    @jax.jit
    def mse(params):
        squared = jnp.square(nnx.merge(graphdef, params, frozen)(*e_args, **cond) - pairs.target)
        erase, retain = halves(squared, devices)
        return jnp.mean(erase), jnp.mean(retain)

    loss, retain_loss = mse(trainable)
    assert float(retain_loss) > 0
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["retain_loss"], retain_loss, rtol=1e-5)
    grads = jax.grad(lambda p: mse(p)[0] + 0.5 * mse(p)[1])(trainable)
    for g, a, o in zip(jax.tree.leaves(grads), jax.tree.leaves(after), jax.tree.leaves(trainable), strict=True):
        update = np.asarray(a) - np.asarray(o)
        rounding = 2 * np.spacing(np.abs(np.asarray(o)).max())
        assert np.abs(update + np.asarray(g)).max() <= 1e-4 * np.abs(np.asarray(g)).max() + rounding
