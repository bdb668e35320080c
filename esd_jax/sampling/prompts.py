"""Prompt lists in the official ESD evaluation scripts' CSV format: prompt, evaluation_seed, case_number."""

import csv
import dataclasses
from pathlib import Path

from esd_jax.config import MAX_SEED
from esd_jax.errors import UserError

CSV_COLUMNS = ("prompt", "evaluation_seed", "case_number")
# Image names are "{case_number}_{i}.png": 15 digits keep them far below a file system's 255 bytes.
MAX_CASE = 10**15 - 1


@dataclasses.dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int
    case_number: int
    # The CSV's other columns (a judge's: the classifier's "class"); they do not change an image.
    columns: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)


def read_prompts_csv(path: Path) -> list[PromptRow]:
    """The rows of an ESD evaluation CSV: columns prompt, evaluation_seed, case_number (others ignored)."""
    if not path.is_file():
        raise UserError(f"prompt file {path}: no such file")
    line = 1  # the line the record being read starts on
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # strict: a quote left open is an error, not a field that swallows the rest of the file.
            reader = csv.DictReader(f, strict=True)
            columns = reader.fieldnames
            if not columns:
                raise UserError(f"{path} is empty; a prompt CSV has a header row with {', '.join(CSV_COLUMNS)}")
            for column in CSV_COLUMNS:
                if column not in columns:
                    raise UserError(
                        f"{path} has no column {column!r}; a prompt CSV has the columns {', '.join(CSV_COLUMNS)} "
                        f"(found: {', '.join(c for c in columns if c)})"
                    )
            twice = next((c for i, c in enumerate(columns) if c and c in columns[:i]), None)
            if twice is not None:
                raise UserError(f"{path}: the header names the column {twice!r} twice; rename or remove one")
            rows, seen = [], {}
            line = reader.line_num + 1
            for record in reader:
                if None in record:  # DictReader's key for the fields past the header's
                    raise UserError(
                        f"{path} line {line}: {len(columns) + len(record[None])} fields, and the header names "
                        f'{len(columns)}; quote a prompt that holds commas ("red, green")'
                    )
                seed = parse_integer(record["evaluation_seed"], path, line, "evaluation_seed")
                if not 0 <= seed <= MAX_SEED:
                    raise UserError(
                        f"{path} line {line}: evaluation_seed {shown(record['evaluation_seed'])} is outside "
                        f"0..{MAX_SEED}"
                    )
                case = parse_integer(record["case_number"], path, line, "case_number")
                if abs(case) > MAX_CASE:
                    raise UserError(
                        f"{path} line {line}: case_number {shown(record['case_number'])} is outside "
                        f"-{MAX_CASE}..{MAX_CASE} "
                        "(it names the images); number the rows with smaller integers"
                    )
                if case in seen:
                    raise UserError(
                        f"{path} line {line}: case_number {case} repeats line {seen[case]}; "
                        "each row needs its own (it names the images)"
                    )
                seen[case] = line
                others = {k: v or "" for k, v in record.items() if k not in CSV_COLUMNS and k}
                rows.append(PromptRow(record["prompt"] or "", seed, case, others))
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); save the CSV as UTF-8") from None
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise UserError(
                f'{path} line {line}: a quote (") opens a field that never closes; close it, or double a quote '
                'inside a quoted field ("")'
            ) from None
        raise UserError(f"{path} line {line}: not a readable CSV ({e})") from None
    if not rows:
        raise UserError(f"{path} has a header but no prompts")
    return rows


def shown(value: str) -> str:
    """A CSV field as a message quotes it: stripped, and cut short (a number of a thousand digits)."""
    text = value.strip()
    return text if len(text) <= 24 else text[:20] + "..."


def parse_integer(value: str | None, path: Path, line: int, column: str) -> int:
    text = (value or "").strip()
    try:
        number = float(text)
        if number.is_integer():
            return int(text) if text.lstrip("+-").isdigit() else int(number)
    except ValueError:
        pass
    raise UserError(f"{path} line {line}: {column} {text!r} is not an integer")
