"""The toy world: synthetic shapes whose every attribute is known, its oracle, and the tiny model's trainer."""

from pathlib import Path

# The shipped toy pipeline (a diffusers folder): what the model name "toy" means everywhere.
EMBEDDED = Path(__file__).parent / "pipeline"
EMBEDDED_NAME = "toy"
# How the toy model samples well: guidance 2 to 4 lifts shape accuracy from 0.68 to 0.83, and 5 adds nothing
# (docs/toy.md, scripts/toy_quality.py).
SAMPLING = {"steps": 25, "guidance": 4.0}
