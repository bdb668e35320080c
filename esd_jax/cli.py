"""`esd-jax COMMAND [--flags]`: parses flags and calls one function per command, nothing more."""

import dataclasses
import sys
from collections.abc import Callable

from absl import flags

from esd_jax.errors import UserError


def info(argv: list[str]) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_string("model", None, "A diffusers folder or a Hugging Face hub id.", flag_values=fv, required=True)
    flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16 or float16.", flag_values=fv)
    parse(fv, argv)
    from esd_jax.summary import describe

    print(describe(fv.model, fv.dtype))


def erase(argv: list[str]) -> None:
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
    parse(fv, argv)
    if fv.config is None:
        raise UserError(f"give a config file: {argv[0]} --config configs/esd_x.py --config.concept='Van Gogh'")
    from esd_jax.train import erase as run

    path = run(EraseConfig.from_config_dict(fv.config))
    if path.exists():
        print(f"erased weights: {path}")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "erase": (erase, "erase a concept from a model (ESD training); resumes from the workdir's checkpoint"),
    "info": (info, "load a pipeline and print its networks, parameter counts and settings"),
}


def parse(fv: flags.FlagValues, argv: list[str]) -> None:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} [--flags]\n\n{fv.get_help(include_special_flags=False)}")
        sys.exit(0)
    try:
        fv(argv)
    except flags.Error as e:
        raise UserError(f"{e}; see `{argv[0]} --help`") from None


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
