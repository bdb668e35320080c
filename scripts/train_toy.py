"""Trains the embedded toy pipeline from scratch on the synthetic world, resumably.

    python scripts/train_toy.py --workdir runs/toy --minutes 90

Rerun the same command to continue a run (each invocation trains for at most --minutes); every
invocation ends by writing the EMA weights as a diffusers folder (--export DIR, default <workdir>/pipeline).
Any scalar setting of esd_jax.toy.train.TrainToyConfig is a flag (--unet-steps 8000); model sizes are not.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from esd_jax.errors import UserError
from esd_jax.toy.train import TrainToyConfig, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/toy"), help="checkpoints, metrics, plots")
    parser.add_argument("--minutes", type=float, default=90.0, help="training budget of this invocation")
    parser.add_argument("--export", type=Path, default=None, help="diffusers folder (default <workdir>/pipeline)")
    defaults = TrainToyConfig()
    for field in dataclasses.fields(TrainToyConfig):
        value = getattr(defaults, field.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = {f.name for f in dataclasses.fields(TrainToyConfig)}
    cfg = TrainToyConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        train(cfg, args.workdir, args.minutes, args.export)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
