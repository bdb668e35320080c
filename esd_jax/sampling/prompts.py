"""Prompt lists in the official ESD evaluation scripts' CSV format: prompt, evaluation_seed, case_number."""

import csv
import dataclasses
from pathlib import Path

from esd_jax.config import MAX_SEED
from esd_jax.errors import UserError

CSV_COLUMNS = ("prompt", "evaluation_seed", "case_number")


@dataclasses.dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int
    case_number: int


def read_prompts_csv(path: Path) -> list[PromptRow]:
    """The rows of an ESD evaluation CSV: columns prompt, evaluation_seed, case_number (others ignored)."""
    if not path.is_file():
        raise UserError(f"prompt file {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise UserError(f"{path} is empty; a prompt CSV has a header row with {', '.join(CSV_COLUMNS)}")
            for column in CSV_COLUMNS:
                if column not in columns:
                    raise UserError(
                        f"{path} has no column {column!r}; a prompt CSV has the columns {', '.join(CSV_COLUMNS)} "
                        f"(found: {', '.join(c for c in columns if c)})"
                    )
            rows, seen = [], {}
            for record in reader:
                line = reader.line_num
                seed = parse_integer(record["evaluation_seed"], path, line, "evaluation_seed")
                if not 0 <= seed <= MAX_SEED:
                    raise UserError(f"{path} line {line}: evaluation_seed {seed} is outside 0..{MAX_SEED}")
                case = parse_integer(record["case_number"], path, line, "case_number")
                if case in seen:
                    raise UserError(
                        f"{path} line {line}: case_number {case} repeats line {seen[case]}; "
                        "each row needs its own (it names the images)"
                    )
                seen[case] = line
                rows.append(PromptRow(record["prompt"] or "", seed, case))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise UserError(f"{path} has a header but no prompts")
    return rows


def parse_integer(value: str | None, path: Path, line: int, column: str) -> int:
    text = (value or "").strip()
    try:
        number = float(text)
        if number.is_integer():
            return int(text) if text.lstrip("+-").isdigit() else int(number)
    except ValueError:
        pass
    raise UserError(f"{path} line {line}: {column} {text!r} is not an integer")
