"""ESD-x erasing "red" from the embedded toy model: the README's first command, a couple of minutes on a CPU.

    esd-jax erase --config configs/toy.py
    esd-jax evaluate --workdir runs/toy-red

The settings come from the sweep in docs/toy.md (scripts/sweep_toy.py). The paper's learning rate of 1e-5
barely moves a model this small in a few hundred steps (its ESD loss is about 1e-4). At eta 1, red
survives on at least 18% of the red prompts' images, mostly circles and triangles; eta 2 (the official
esd_sd.py's --negative_guidance 3) brings it to 14% in 200 iterations (the mean over three erase and
three evaluation seeds; 8% at the first of each) while the other colours keep 95% of their accuracy.

The fast mode: 32 trajectories of the frozen model, sampled once, give the 800 (x_t, target) pairs the
200 iterations of 4 train on, each once. It erases as the per-iteration recipe does (16% against 14%,
within the evaluation's noise) in 22 s against 76 s: docs/toy.md, "The fast mode".
"""

from esd_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "toy"
    config.concept = "red"
    config.method = "esd-x"
    config.iterations = 200
    config.learning_rate = 1e-3
    config.negative_guidance = 2.0
    config.ddim_steps = 25
    config.batch_per_device = 4
    config.trajectories = 32
    config.checkpoint_every = 100
    config.workdir = "runs/toy-red"
    return config
