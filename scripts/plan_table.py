"""The table of docs/accelerators.md: `esd-jax plan` for each model x method x topology x dtype.

    python scripts/plan_table.py                              # every row; resumes, skipping rows done
    python scripts/plan_table.py --only sd14                  # rows whose name contains "sd14"
    python scripts/plan_table.py --table                      # print the table of the rows done so far
    python scripts/plan_table.py --table --doc                # and put it in docs/accelerators.md

Each row is one `esd-jax plan` process (its compile time is its own) writing docs/plans/<row>.json, or
<row>.refused with plan's line where the TPU compiler refuses the program; a row already there is kept,
so a run stopped midway continues where it stopped. An SD-size plan compiles for minutes to tens of
minutes on a 2-core host.
"""

import argparse
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from esd_jax.files import atomic_file
from esd_jax.plan import REFUSED

# Each model's config and flags. SDXL's own config shards the weights for both methods (its esd-x,
# replicated, misses a v5e chip by 0.16 GiB) and plans 1024 px.
MODELS = {
    "sd14": ("esd_x.py", ["--config.model=CompVis/stable-diffusion-v1-4"]),
    "sd21": ("esd_x.py", ["--config.model=stabilityai/stable-diffusion-2-1"]),
    "sdxl": ("esd_x_sdxl.py", []),
}
METHODS = {"esd-x": [], "esd-u": ["--config.shard_params=True"]}
TOPOLOGIES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4", "v5e-16": "v5e:4x4"}
# float32: as the paper trains; bfloat16: compute and frozen weights in bfloat16, Adam and the trained
# weights float32.
DTYPES = {
    "float32": ["--config.dtype=float32", "--config.frozen_dtype=float32"],
    "bfloat16": ["--config.dtype=bfloat16", "--config.frozen_dtype=bfloat16"],
}
ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "accelerators.md"
MARKS = ("<!-- plan_table -->\n", "<!-- /plan_table -->\n")


def rows():
    for model, (config, model_flags) in MODELS.items():
        for method, method_flags in METHODS.items():
            for topology, name in TOPOLOGIES.items():
                for dtype, dtype_flags in DTYPES.items():
                    flags = [f"--config={CONFIGS / config}", *model_flags, f"--config.method={method}"]
                    flags += [*method_flags, *dtype_flags]
                    yield f"{model}-{method}-{topology}-{dtype}", (model, method, topology, dtype), name, flags


def run(out: Path, only: str) -> None:
    for row, _, topology, flags in rows():
        path, refused = out / f"{row}.json", out / f"{row}.refused"
        if only not in row or path.exists() or refused.exists():
            continue
        print(f"plan {row} ...", flush=True)
        command = ["esd-jax", "plan", *flags, "--config.concept=Van Gogh"]
        done = subprocess.run([*command, f"--topology={topology}", f"--json={path}"], capture_output=True, text=True)
        (out / f"{row}.log").write_text(done.stdout + done.stderr)
        if path.exists():
            continue
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if done.returncode < 0:  # SIGKILL: most often the kernel's, for want of host memory
            last = f"killed by {signal.Signals(-done.returncode).name} (the host's memory? see dmesg): {last}"
        # The TPU compiler's refusal is the row's answer and is kept; any other failure (the host's
        # memory, say) is tried again next time.
        if last.startswith(f"error: {REFUSED}"):
            with atomic_file(refused) as tmp:
                tmp.write_text(last + "\n")
        print(f"  failed: {last}", flush=True)


def table(out: Path) -> str:
    lines = [
        "| model | method | TPU | dtype | HBM per chip, peak (of the chip's) | TFLOP per iteration | "
        "bound s per iteration | 1000 iterations | compile s | compile CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, (model, method, topology, dtype), _, _ in rows():
        path, refused = out / f"{row}.json", out / f"{row}.refused"
        if refused.exists():
            lines.append(f"| {model} | {method} | {topology} | {dtype} | {refusal(refused)} | | | | | |")
        if not path.exists():
            continue
        p = json.loads(path.read_text())
        fits = "" if p["fits"] else " **does not fit**"
        # rows planned before plan kept the CPU seconds have none
        cpu = f"{p['compile_cpu_seconds']:.0f}" if "compile_cpu_seconds" in p else "—"
        lines.append(
            f"| {model} | {method} | {topology} | {dtype} | {p['peak_bytes'] / 2**30:.1f} GiB "
            f"({p['peak_bytes'] / p['capacity_bytes']:.0%}){fits} | {p['math_flops_per_unit'] / 1e12:.1f} | "
            f"{p['bound_seconds_per_unit']:.2f} | {p['bound_seconds_per_unit'] * 1000 / 60:.0f} min | "
            f"{p['compile_seconds']:.0f} | {cpu} |"
        )
    return "\n".join(lines)


def refusal(path: Path) -> str:
    """The table's cell for a row the TPU compiler refused: which of the chip's memories ran out."""
    found = re.search(r"Ran out of memory in memory space (\w+)\. Used (\S+) of (\S+) ", path.read_text())
    if found is None:
        return f"**does not compile** ({path.name})"
    space, used, has = found.groups()
    return f"**does not compile**: the compiler's {space} memory, {used} of {has}"


def into_doc(text: str) -> None:
    """The table between DOC's two MARKS, in place of the one there."""
    doc = DOC.read_text()
    begin, end = doc.index(MARKS[0]) + len(MARKS[0]), doc.index(MARKS[1])
    with atomic_file(DOC) as tmp:
        tmp.write_text(doc[:begin] + text + "\n" + doc[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "plans")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this")
    parser.add_argument("--table", action="store_true", help="print the table of the rows done, run nothing")
    parser.add_argument("--doc", action="store_true", help=f"also write the table into {DOC.name}, between its marks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run(args.out, args.only)
    text = table(args.out)
    print(text)
    if args.doc:
        into_doc(text)


if __name__ == "__main__":
    sys.exit(main())
