"""Atomic writes: outputs appear whole or not at all, and never replace good files with half ones."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from esd_jax.errors import UserError


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a file name such as {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces the folder `path` only if the block succeeds."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
