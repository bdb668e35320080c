"""`esd-jax COMMAND [--flags]`: parses flags and calls one function per command, nothing more."""

import dataclasses
import os
import sys
import typing
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


def erase_config(fv: flags.FlagValues, argv: list[str], usage: str):
    """The EraseConfig of `--config FILE [--config.KEY=VALUE ...]` and any flags `fv` defines besides."""
    import ml_collections
    from ml_collections import config_flags

    from esd_jax.config import EraseConfig

    config_flags.DEFINE_config_file(
        "config",
        None,
        "A config file from configs/, e.g. configs/esd_x.py; any key is overridden with --config.KEY=VALUE.",
        flag_values=fv,
        lock_config=True,
    )
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(f"usage: {argv[0]} {usage}\n")
        if len(list(fv)) > 1:  # flags besides --config
            print(fv.get_help(include_special_flags=False) + "\n")
        print("config keys (defaults):")
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
    return EraseConfig.from_config_dict(config)


def erase(argv: list[str]) -> None:
    cfg = erase_config(flags.FlagValues(), argv, "--config configs/esd_x.py [--config.KEY=VALUE ...]")
    from esd_jax.train import erase as run

    path = run(cfg)
    if path.exists():
        print(f"erased weights: {path}")


def plan(argv: list[str]) -> None:
    # A plan reports the compile time it saw: programs from the cache would hide it.
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if len(argv) > 1 and argv[1] == "sample":
        return plan_sampling([f"{argv[0]} sample", *argv[2:]])
    fv = flags.FlagValues()
    define_plan_flags(fv)
    cfg = erase_config(fv, argv, "--config configs/esd_x.py [--config.KEY=VALUE ...] --topology v5e:2x4 [--json F]")
    if fv.topology is None:
        raise UserError(f"give --topology: {argv[0]} --config configs/esd_x.py --topology v5e:2x4")
    from esd_jax import plan as planning

    found = planning.plan_erase(cfg, fv.topology)
    show_plan(found, fv.json, planning.erase_changes(cfg, found.topo))


def plan_sampling(argv: list[str]) -> None:
    from esd_jax.config import EMBEDDED_NAME, SAMPLE_DTYPES, SCHEDULERS, SampleConfig

    fv = flags.FlagValues()
    define_plan_flags(fv)
    flags.DEFINE_string(
        "model", EMBEDDED_NAME, "A diffusers folder (its configs suffice), a hub id or toy.", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 8, "Images per compiled call, over all devices.", flag_values=fv)
    flags.DEFINE_integer("resolution", 0, "Image side in pixels; 0: the model's native size.", flag_values=fv)
    flags.DEFINE_integer("steps", None, "Denoising steps (default: the model's, as esd-jax sample).", flag_values=fv)
    flags.DEFINE_float("guidance", None, "Guidance scale (default: the model's, as esd-jax sample).", flag_values=fv)
    flags.DEFINE_enum("scheduler", "ddim", SCHEDULERS, "The sampler.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", SAMPLE_DTYPES, "Compute dtype.", flag_values=fv)
    parse(fv, argv)
    if fv.topology is None:
        raise UserError(f"give --topology: {argv[0]} --model CompVis/stable-diffusion-v1-4 --topology v5e:2x4")
    if fv.batch_size < 1 or (fv.steps is not None and fv.steps < 1):
        raise UserError("--batch_size and --steps must be at least 1")
    steps, guidance = SampleConfig(steps=fv.steps, guidance=fv.guidance).sampling(fv.model)
    from esd_jax import plan as planning

    found = planning.plan_sample(
        fv.model,
        fv.topology,
        batch_size=fv.batch_size,
        resolution=fv.resolution,
        steps=steps,
        guidance=guidance,
        scheduler=fv.scheduler,
        dtype=fv.dtype,
    )
    changes = ["--dtype bfloat16"] if fv.dtype == "float32" else []
    show_plan(found, fv.json, [*changes, "a smaller --batch_size", "a smaller --resolution"])


def define_plan_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "topology", None, "A TPU slice: v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, v5e:4x4 (4 hosts), ...", flag_values=fv
    )
    flags.DEFINE_string("json", None, "Also write the plan to this JSON file.", flag_values=fv)


def show_plan(found, json_path: str | None, changes: list[str]) -> None:
    from esd_jax import plan as planning

    print(planning.report(found))
    if json_path:
        planning.write_json(found, Path(json_path))
    if not found.fits:
        raise UserError(planning.misfit(found, changes))


def export(argv: list[str]) -> None:
    from esd_jax.export import EXPORT_FORMATS, export_run

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "The erase run's workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors file (the others).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).", flag_values=fv)
    flags.DEFINE_enum(
        "format",
        "diffusers",
        EXPORT_FORMATS,
        "diffusers: a StableDiffusionPipeline (or XL) folder; "
        "single-file: one .safetensors in the original SD layout (A1111, ComfyUI); "
        "delta: the trained layers' weights under diffusers keys (the official ESD file); "
        "lora-kohya: a kohya LoRA (A1111, ComfyUI, kohya's tools); "
        "lora-diffusers: the file diffusers' pipe.load_lora_weights() reads. "
        "A LoRA run's adapters are merged into the full formats.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "rank",
        None,
        "With a lora format: the rank of a truncated SVD of what the run changed, for any run (needed for a "
        "full-weight one); its relative error is printed. Default: a LoRA run's own adapters.",
        flag_values=fv,
    )
    parse(fv, argv)
    for name in ("workdir", "out"):
        if fv[name].value is None:
            raise UserError(
                f"give --{name}: {argv[0]} --workdir RUN --out FOLDER (or FILE.safetensors --format single-file)"
            )
    out = export_run(Path(fv.workdir), Path(fv.out), step=fv.step, fmt=fv.format, rank=fv.rank)
    print(f"exported: {out}")


def sample(argv: list[str]) -> None:
    from esd_jax.config import SampleConfig

    cfg = parse_options(SampleConfig, argv)
    from esd_jax.sampling.folder import sample_to_folder

    made = sample_to_folder(cfg)
    print(f"sampled {made} images into {cfg.out}")


def evaluate(argv: list[str]) -> None:
    from esd_jax.config import EvaluateConfig

    cfg = parse_options(EvaluateConfig, argv)
    if cfg.prompts is not None:
        from esd_jax.judges.evaluate import judge_prompts

        judge_prompts(cfg)
        return
    from esd_jax.toy.evaluate import evaluate_erasure

    evaluate_erasure(cfg)


def attack(argv: list[str]) -> None:
    from esd_jax.config import AttackConfig

    cfg = parse_options(AttackConfig, argv)
    from esd_jax.attack.folder import attack_to_folder

    if cfg.prompts is not None:
        from esd_jax.sampling.prompts import read_prompts_csv

        rows = read_prompts_csv(Path(cfg.prompts))
    else:
        from esd_jax.toy.evaluate import attack_rows

        cfg, rows = attack_rows(cfg)
    attack_to_folder(cfg, rows)


def parse_options(cls, argv: list[str]):
    """One flag per field of the config dataclass `cls` (its default and help declared there, once);
    returns the validated config."""
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool, str: flags.DEFINE_string}
    fv = flags.FlagValues()
    for field in dataclasses.fields(cls):
        kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
        help_text, choices = field.metadata["help"], field.metadata["choices"]
        if choices:
            flags.DEFINE_enum(field.name, field.default, choices, help_text, flag_values=fv)
        else:
            define[kind](field.name, field.default, help_text, flag_values=fv)
    parse(fv, argv)
    cfg = cls(**{field.name: fv[field.name].value for field in dataclasses.fields(cls)})
    cfg.validate()
    return cfg


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "erase": (erase, "erase a concept from a model (ESD training); resumes from the workdir's checkpoint"),
    "evaluate": (evaluate, "base against erased: the toy oracle, or NudeNet, classifier, CLIP, LPIPS, FID"),
    "attack": (attack, "adversarial prompts against an erased model: how much of the concept they bring back"),
    "export": (export, "convert a run's checkpoint to PyTorch: a diffusers folder, a single file, the delta, a LoRA"),
    "plan": (plan, "compile the erase step (plan sample: the sampler) for a TPU topology: memory, FLOPs, time"),
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
        if any(a.startswith("--config.") for a in args):
            raise UserError(
                f"give a config file before its overrides: {argv[0]} --config configs/esd_x.py --config.KEY=VALUE"
            )
        return
    name, *argument = names[-1].split(":", 1)  # config_flags passes "file.py:argument" to get_config
    path = Path(name)
    layout = "configs/ holds esd_x.py, esd_x_strict.py, esd_u.py, esd_all.py and toy.py"
    if not path.is_file():
        raise UserError(f"cannot load the config file {str(path)!r}: no such file; {layout}")
    if path.suffix != ".py":
        raise UserError(f"the config file {str(path)!r} is not a Python file (.py) with get_config(); {layout}")
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
    saved, sys.argv = sys.argv, argv  # config_flags reads the --config.KEY overrides from sys.argv
    try:
        extra = fv(argv)[1:]
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an override of an unknown key as AttributeError/KeyError.
        message = str(e).strip("\"'").splitlines()[0]
        raise UserError(f"bad flag or config override ({message}); see `{argv[0]} --help`") from None
    finally:
        sys.argv = saved
    if extra:
        raise UserError(
            f"unexpected argument {extra[0]!r}: every value follows a flag, and one with spaces is quoted "
            f"(--prompt 'a red car', --config.concept='Van Gogh'); see `{argv[0]} --help`"
        )


def usage() -> str:
    lines = ["usage: esd-jax COMMAND [--flags]   (esd-jax COMMAND --help lists a command's flags)", ""]
    lines += [f"  {name:10s}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def use_compilation_cache() -> None:
    """Keeps XLA's compiled programs on disk, so that a resumed or repeated run compiles nothing.

    Set through the environment, before JAX is imported: JAX_COMPILATION_CACHE_DIR moves the cache,
    JAX_ENABLE_COMPILATION_CACHE=false turns it off.
    """
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(home / "esd-jax" / "xla"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))  # the least recently used go first


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    use_compilation_cache()
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax and JAX log routine events at INFO and WARNING
    if command not in COMMANDS:
        print(
            f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (esd-jax --help)", file=sys.stderr
        )
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
