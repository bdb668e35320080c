"""Atomic writes: outputs appear whole or not at all, and never replace good files with half ones.

A write goes to a hidden sibling named `.<name>.tmp-<pid>` and is renamed into place. What a killed
process leaves behind (its temporaries, or a folder it had moved aside) is cleaned up, or put back,
by the next write of the same path.
"""

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from esd_jax.errors import UserError

RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
AT_FDCWD = -100


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def hidden(path: Path, kind: str, pid: int) -> Path:
    """`.<name>.<kind>-<pid>`, keeping a file's suffix last so that writers that go by it still can."""
    return path.parent / f".{path.name}.{kind}-{pid}{path.suffix if kind == 'tmp' else ''}"


def leftovers(path: Path, kind: str) -> list[Path]:
    """Hidden siblings of `path` of this `kind` whose writing process is no longer running."""
    if not path.parent.is_dir():
        return []
    suffix = re.escape(path.suffix) if kind == "tmp" else ""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}-(\d+){suffix}")
    found = []
    for sibling in path.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            found.append(sibling)
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: Path) -> None:
    """Restores a folder an interrupted replacement had moved aside, and deletes dead writers' temporaries."""
    for old in leftovers(path, "old"):
        if not path.exists():
            old.rename(path)
            print(f"{path}: restored the previous version, which an interrupted write had left at {old}")
        else:
            remove(old)
    for tmp in leftovers(path, "tmp"):
        remove(tmp)
        print(f"{path}: removed {tmp.name}, the temporary of an interrupted write")


def check_writable(path: Path) -> None:
    """Fails now, not after hours of work, if `path` cannot be written (name too long, no permission)."""
    # A random name: hosts of a pod may share a folder and, in containers, a pid.
    probe = path.with_name(f".{path.name}.probe-{secrets.token_hex(8)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    probe.unlink()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a file name such as {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = hidden(path, "tmp", os.getpid())
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces the folder `path` only if the block succeeds.

    The old folder and the new one are swapped in one step where the system allows it; elsewhere the
    old one is moved aside first, and a run killed between the two renames has it put back by the next.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = hidden(path, "tmp", os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
    elif exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:
        old = hidden(path, "old", os.getpid())
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)


def fingerprint(folder: Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file under `folder` (links followed, hidden names left out):
    a change to any of them shows, without hashing gigabytes of weights."""
    found = sorted(
        p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return [
        [p.relative_to(folder).as_posix(), s.st_size, s.st_mtime_ns] for p in found if p.is_file() for s in [p.stat()]
    ]
