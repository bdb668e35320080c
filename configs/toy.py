"""ESD-x-strict erasing "red" from the embedded toy model, the other colours held by retain prompts: the
README's first command, a couple of minutes on a CPU.

    esd-jax erase --config configs/toy.py
    esd-jax evaluate --workdir runs/toy-red

The settings come from the sweeps in docs/toy.md (scripts/sweep_toy.py). The paper's learning rate of
1e-5 barely moves a model this small in a few hundred steps (its ESD loss is about 1e-4), so Adam runs at
1e-3. ESD alone trades red against the other colours: pushed until red is gone from every red prompt
(eta 3, 400 iterations), yellow and green lose a quarter of their accuracy. The retain prompts "green",
"blue" and "yellow" (each step also trains as many pairs sampled under them towards the frozen model's
own prediction) and training only the cross-attention keys and values (esd-x-strict) hold them: red
leaves every red prompt while the other colours keep 95% of their accuracy (docs/toy.md, "A stronger
erasure with retain prompts").

The fast mode: 32 trajectories of the frozen model (and 32 under the retain prompts), sampled once,
give the 800 (x_t, target) pairs that the 400 iterations of 4 train on, each twice.

    esd-jax erase --config configs/toy.py:robust
    esd-jax attack --workdir runs/toy-red-robust --out attacks/toy-red-robust

makes the erasure robust to adversarial prompts (esd_jax/robust.py, after AdvUnlearn): every 10 iterations
an inner attack of 10 Adam steps (esd-jax attack's embedding attacker at its learning rate, against the
frozen model's prediction under "red" on the step's own x_t) finds the 5-token prefix under which the
model being trained draws red again, and every iteration also trains the erasure under it. An iteration
costs about 2.6x the plain one; the other colours keep their accuracy as well (README, "Does the erasure
hold?").
"""

from esd_jax.config import default_config


def get_config(variant: str = ""):
    config = default_config()
    config.model = "toy"
    config.concept = "red"
    config.retain = "green|blue|yellow"
    config.method = "esd-x-strict"
    config.iterations = 400
    config.learning_rate = 1e-3
    config.negative_guidance = 3.0
    config.ddim_steps = 25
    config.batch_per_device = 4
    config.trajectories = 32
    config.checkpoint_every = 100
    config.workdir = "runs/toy-red"
    if variant == "robust":
        config.robust_every = 10
        config.robust_steps = 10
        config.robust_lr = 0.01
        config.robust_tokens = 5
        config.workdir = "runs/toy-red-robust"
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; configs/toy.py:robust is the one there is")
    return config
