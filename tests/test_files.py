"""Atomic outputs: whole or absent at every instant, and what a killed writer leaves is put right."""

import subprocess
import sys

import pytest

from esd_jax import files
from esd_jax.files import atomic_dir, atomic_file, hidden


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_a_folder_is_replaced_whole(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # the old folder stays in place while writing
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_moved_aside_by_a_killed_writer_is_restored(tmp_path, capsys):
    out = tmp_path / "out"
    old = hidden(out, "old", dead_pid())  # killed between its two renames: the old folder aside, no new one
    old.mkdir()
    (old / "model.txt").write_text("good")
    with atomic_dir(out) as tmp:
        assert (out / "model.txt").read_text() == "good"  # back in place before anything else happens
        (tmp / "model.txt").write_text("newer")
    assert (out / "model.txt").read_text() == "newer"
    assert "restored the previous version" in capsys.readouterr().out
    files.clean_leftovers(tmp_path / "other")  # nothing to do elsewhere


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, capsys):
    out = tmp_path / "image.png"
    stale, stale_dir = hidden(out, "tmp", dead_pid()), hidden(tmp_path / "export", "tmp", dead_pid())
    live = hidden(out, "tmp", 1)  # pid 1 is always running
    stale.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "unet.safetensors").write_bytes(b"gigabytes")
    live.write_bytes(b"someone else's, still writing")
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"png")
    with atomic_dir(tmp_path / "export"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["image.png", "export", live.name])
    assert capsys.readouterr().out.count("the temporary of an interrupted write") == 2


def test_unwritable_names_fail_before_the_work(tmp_path):
    with pytest.raises(files.UserError, match="cannot write .*: File name too long"):
        files.check_writable(tmp_path / ("x" * 300))
    files.check_writable(tmp_path / "fine.safetensors")
    assert not list(tmp_path.iterdir())
