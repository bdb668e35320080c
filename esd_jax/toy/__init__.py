"""The toy world: synthetic shapes whose every attribute is known, its oracle, and the tiny model's trainer."""

from pathlib import Path

# The shipped toy pipeline (a diffusers folder): what the model name "toy" means everywhere.
EMBEDDED = Path(__file__).parent / "pipeline"
EMBEDDED_NAME = "toy"
# How the toy model samples well (issue 5's experiment: its shapes smear at guidance 4-6).
SAMPLING = {"steps": 25, "guidance": 2.0}
