"""`esd-jax COMMAND [--flags]`: parses flags and calls one function per command, nothing more."""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from absl import flags
from absl import logging as absl_logging

from esd_jax.errors import UserError


def info(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("model", "toy", "A diffusers folder, a hub id, or toy (the embedded model).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16.", flag_values=fv)
    parse(fv, argv)
    from esd_jax.summary import describe

    print(describe(fv.model, fv.dtype))


def erase(argv: list[str]) -> None:
    import ml_collections
    from ml_collections import config_flags

    from esd_jax.config import EraseConfig

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A config file from configs/, e.g. configs/esd_x.py; any key is overridden with --config.KEY=VALUE.",
        flag_values=fv,
        lock_config=True,
    )
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(f"usage: {argv[0]} --config configs/esd_x.py [--config.KEY=VALUE ...]\n\nconfig keys (defaults):")
        for field in dataclasses.fields(EraseConfig):
            print(f"  --config.{field.name}={field.default!r}")
        sys.exit(0)
    check_config_file(argv)
    parse(fv, argv)
    config = fv.config
    if config is None:
        raise UserError(f"give a config file: {argv[0]} --config configs/esd_x.py --config.concept='Van Gogh'")
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags' stand-in for a file that failed to load
        raise UserError(
            f"cannot load the config file {fv['config'].config_filename!r}: no such file, or it "
            "fails to import; configs/ holds esd_x.py, esd_x_strict.py, esd_u.py, esd_all.py"
        )
    from esd_jax.train import erase as run

    path = run(EraseConfig.from_config_dict(config))
    if path.exists():
        print(f"erased weights: {path}")


def export(argv: list[str]) -> None:
    from esd_jax.export import EXPORT_FORMATS, export_run

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "The erase run's workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors file (single-file).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).", flag_values=fv)
    flags.DEFINE_enum(
        "format",
        "diffusers",
        EXPORT_FORMATS,
        "diffusers: a StableDiffusionPipeline folder; "
        "single-file: one .safetensors in the original SD layout (A1111, ComfyUI).",
        flag_values=fv,
    )
    parse(fv, argv)
    for name in ("workdir", "out"):
        if fv[name].value is None:
            raise UserError(
                f"give --{name}: {argv[0]} --workdir RUN --out FOLDER (or FILE.safetensors --format single-file)"
            )
    out = export_run(Path(fv.workdir), Path(fv.out), step=fv.step, fmt=fv.format)
    print(f"exported: {out}")


def sample(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "model",
        None,
        "A diffusers folder, a hub id or toy (default: the --workdir run's model, else toy).",
        flag_values=fv,
    )
    flags.DEFINE_string("workdir", None, "Sample from this erase run's latest checkpoint.", flag_values=fv)
    flags.DEFINE_string(
        "esd", None, "Sample with an official-format ESD delta (.safetensors, diffusers keys).", flag_values=fv
    )
    flags.DEFINE_string("prompt", None, "One prompt (its images: OUT/0_<i>.png).", flag_values=fv)
    flags.DEFINE_string(
        "prompts",
        None,
        "A CSV with columns prompt, evaluation_seed, case_number (images: OUT/<case>_<i>.png).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out",
        None,
        "Output folder; images already there are kept if made from the same inputs (OUT/sample.json records them).",
        flag_values=fv,
    )
    flags.DEFINE_integer("steps", None, "Denoising steps (default: 50; the toy model's 25).", flag_values=fv)
    flags.DEFINE_float(
        "guidance", None, "Classifier-free guidance scale, 1: none (default: 7.5; the toy model's 4).", flag_values=fv
    )
    flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "The seed of --prompt (a CSV gives each row's evaluation_seed).", flag_values=fv)
    flags.DEFINE_integer("resolution", None, "Image side in pixels (default: the model's native size).", flag_values=fv)
    flags.DEFINE_enum("scheduler", "ddim", ["ddim", "dpm++"], "DDIM or DPM-Solver++ (2M).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per compiled call, over all devices.", flag_values=fv)
    flags.DEFINE_bool(
        "compare",
        False,
        "Also sample the base model (OUT/base/) and write both side by side in OUT/compare.png.",
        flag_values=fv,
    )
    parse(fv, argv)
    if fv.out is None:
        raise UserError(f"give --out FOLDER for the images: {argv[0]} --prompt TEXT --out FOLDER")
    from esd_jax.sampling.folder import sample_to_folder

    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    made = sample_to_folder(
        model=fv.model,
        out=Path(fv.out),
        prompt=fv.prompt,
        prompts=path(fv.prompts),
        workdir=path(fv.workdir),
        esd=path(fv.esd),
        compare=fv.compare,
        seed=fv.seed,
        num_per_prompt=fv.num_per_prompt,
        steps=fv.steps,
        guidance=fv.guidance,
        scheduler=fv.scheduler,
        resolution=fv.resolution,
        dtype=fv.dtype,
        batch_size=fv.batch_size,
    )
    print(f"sampled {made} images into {fv.out}")


def evaluate(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("model", None, "The base model (default: the --workdir run's model, else toy).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "The erased model: this erase run's latest checkpoint.", flag_values=fv)
    flags.DEFINE_string("esd", None, "The erased model: an official-format ESD delta (.safetensors).", flag_values=fv)
    flags.DEFINE_string(
        "concept", None, "The erased concept: a colour, shape or style (default: the run's concept).", flag_values=fv
    )
    flags.DEFINE_string("json", None, "Also write the report to this JSON file.", flag_values=fv)
    flags.DEFINE_string(
        "grid", None, "The picture (default: evaluate-<concept>.png in the workdir, else here).", flag_values=fv
    )
    from esd_jax.toy.evaluate import Settings, run

    defaults = Settings()
    flags.DEFINE_integer("num_per_prompt", defaults.num_per_prompt, "Images per prompt and model.", flag_values=fv)
    flags.DEFINE_integer("steps", defaults.steps, "DDIM steps.", flag_values=fv)
    flags.DEFINE_float("guidance", defaults.guidance, "Classifier-free guidance scale.", flag_values=fv)
    flags.DEFINE_integer(
        "seed", defaults.seed, "Image i of every prompt starts from the noise of (seed, i).", flag_values=fv
    )
    flags.DEFINE_integer(
        "batch_size", defaults.batch_size, "Images per compiled call, over all devices.", flag_values=fv
    )
    parse(fv, argv)

    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    run(
        model=fv.model,
        concept=fv.concept,
        workdir=path(fv.workdir),
        esd=path(fv.esd),
        json_path=path(fv.json),
        grid=path(fv.grid),
        settings=Settings(fv.num_per_prompt, fv.steps, fv.guidance, fv.seed, fv.batch_size),
    )


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "erase": (erase, "erase a concept from a model (ESD training); resumes from the workdir's checkpoint"),
    "evaluate": (evaluate, "toy model: how often the erased concept still appears, and what else changed"),
    "export": (export, "convert a run's checkpoint to PyTorch: a diffusers folder or one single file"),
    "info": (info, "load a pipeline and print its networks, parameter counts and settings"),
    "sample": (sample, "sample images from a prompt or a prompt CSV, base or erased model; resumes a run"),
}


def check_config_file(argv: list[str]) -> None:
    """Loads the --config file once on its own, so that a file that is not a config (binary, a syntax
    error, a missing import, no get_config) gets one line instead of config_flags' traceback."""
    import importlib.util

    import ml_collections

    args = argv[1:]
    names = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    names += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    if not names:
        return
    name, *argument = names[-1].split(":", 1)  # config_flags passes "file.py:argument" to get_config
    path = Path(name)
    layout = "configs/ holds esd_x.py, esd_x_strict.py, esd_u.py, esd_all.py and toy.py"
    if not path.is_file():
        raise UserError(f"cannot load the config file {str(path)!r}: no such file; {layout}")
    try:
        spec = importlib.util.spec_from_file_location("esd_jax_user_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*argument)
    except Exception as e:  # anything a Python file can raise on import
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot load the config file {str(path)!r}: {type(e).__name__}: {first}; {layout}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(
            f"the config file {str(path)!r}: get_config() returned a {type(config).__name__}, not a ConfigDict"
        )


def parse(fv: flags.FlagValues, argv: list[str]) -> None:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} [--flags]\n\n{fv.get_help(include_special_flags=False)}")
        sys.exit(0)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an override of an unknown key as AttributeError/KeyError.
        message = str(e).strip("\"'").splitlines()[0]
        raise UserError(f"bad flag or config override ({message}); see `{argv[0]} --help`") from None


def usage() -> str:
    lines = ["usage: esd-jax COMMAND [--flags]   (esd-jax COMMAND --help lists a command's flags)", ""]
    lines += [f"  {name:10s}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax and JAX log routine events at INFO and WARNING
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command][0]([f"esd-jax {command}", *argv[2:]])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
