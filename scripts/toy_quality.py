"""The toy model's quality gate over sampling guidance: how often the oracle agrees with each (colour, shape) prompt.

    python scripts/toy_quality.py --guidance 2,3,4 --num-per-prompt 64

Prints, per guidance, the colour and shape accuracy over the 12 "a {colour} {shape}" prompts and the
shape confusion (what the oracle read for each prompted shape); the quality gate is colour >= 0.9 and
shape >= 0.8 at 64 images per prompt.
"""

import argparse
import sys

from esd_jax.config import EMBEDDED_NAME, EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.pipeline import load_pipeline
from esd_jax.toy import evaluate as ev
from esd_jax.toy import world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_NAME)
    parser.add_argument("--guidance", default="2,3", help="comma-separated guidance scales")
    parser.add_argument("--num-per-prompt", type=int, default=64)
    args = parser.parse_args()
    try:
        scales = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        sys.exit(f"error: --guidance {args.guidance!r}: give numbers separated by commas, e.g. 2,3")
    try:
        pipe = load_pipeline(args.model)
    except UserError as e:
        sys.exit(f"error: {e}")
    shapes = "/".join((*world.SHAPES, "none"))
    print(f"{'guidance':>8s} {'colour':>7s} {'shape':>7s}  shape confusion (prompted shape: read as {shapes})")
    for g in scales:
        q = ev.quality(pipe, EvaluateConfig(num_per_prompt=args.num_per_prompt, guidance=g, batch_size=256))
        matrix = "; ".join(f"{s}: " + "/".join(map(str, row.values())) for s, row in q["confusion"].items())
        print(f"{g:8.1f} {q['colour']:7.3f} {q['shape']:7.3f}  {matrix}", flush=True)


if __name__ == "__main__":
    main()
