"""Checkpoints that can't hurt: a torn latest falls back to the one before it; a full or unwritable
storage path is one line and leaves no partial file; the checkpoints already there are untouched."""

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from gdnsq.errors import ExportError, StorageError
from gdnsq.training.checkpoint import CHECKPOINT_FILE, PREVIOUS_FILE, load_latest, save_checkpoint


def state(epoch: int) -> dict:
    return {"config": {}, "engine": {"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}}}


def test_torn_latest_resumes_from_the_one_before_with_a_warning(tmp_path, caplog):
    path = tmp_path / "run" / CHECKPOINT_FILE
    save_checkpoint(state(1), path, keep_previous=True)
    save_checkpoint(state(2), path, keep_previous=True)
    assert load_latest(path)["engine"]["epoch"] == 2
    with open(path, "r+b") as f:  # torn: the latest file cut in half
        f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING, logger="gdnsq"):
        resumed = load_latest(path)
    assert resumed["engine"]["epoch"] == 1 and torch.equal(resumed["engine"]["model"]["w"], torch.ones(4))
    assert "unreadable" in caplog.text and PREVIOUS_FILE in caplog.text


def test_crash_between_the_renames_still_resumes(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(state(1), path, keep_previous=True)
    save_checkpoint(state(2), path, keep_previous=True)
    path.unlink()  # the latest was moved aside but the new one never landed
    assert load_latest(path)["engine"]["epoch"] == 1
    (tmp_path / PREVIOUS_FILE).unlink()
    assert load_latest(path) is None  # nothing there: a fresh run


def test_torn_only_checkpoint_is_one_line(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ExportError, match=r"unreadable .* no earlier one; pass --fresh") as e:
        load_latest(path)
    assert "\n" not in str(e.value)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(state(1), path, keep_previous=True)
    before = path.read_bytes()
    tmp = tmp_path / f".{CHECKPOINT_FILE}.tmp"
    os.symlink("/dev/full", tmp)  # every write to the temporary file: ENOSPC, as on a full disk
    with pytest.raises(StorageError, match=r"^ray\.storage_path: cannot write checkpoint .*No space left") as e:
        save_checkpoint(state(2), path, keep_previous=True)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before and not os.path.lexists(tmp) and not (tmp_path / PREVIOUS_FILE).exists()


def test_unwritable_storage_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"^ray\.storage_path: cannot write checkpoint"):
        save_checkpoint(state(1), tmp_path / "file" / "run" / CHECKPOINT_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _save_under_file_size_limit(path, limit: int) -> subprocess.CompletedProcess:
    """save_checkpoint of a ~400 kB state in a child process whose files may not exceed ``limit`` bytes (``ulimit
    -f``: the kernel refuses the write past the limit with EFBIG; Python ignores SIGXFSZ, so it is an OSError)."""
    code = (
        "import resource, sys, torch\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from gdnsq.training.checkpoint import save_checkpoint\n"
        "from gdnsq.errors import StorageError\n"
        "try:\n"
        "    save_checkpoint({'engine': {'epoch': 2, 'model': {'w': torch.zeros(100_000)}}}, sys.argv[1],"
        " keep_previous=True)\n"
        "except StorageError as e:\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)


def test_file_size_limit_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """torch reports a write past ``ulimit -f`` as a RuntimeError about its zip stream, raised while handling the
    OSError: still one StorageError line naming the OS's reason, no temporary file, the earlier checkpoint kept."""
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(state(1), path, keep_previous=True)
    before = path.read_bytes()
    out = _save_under_file_size_limit(path, limit=64 * 1024)
    assert out.returncode == 2, out.stderr
    line = out.stdout.strip()
    assert "\n" not in line and not out.stderr.strip(), out
    expected = rf"ray\.storage_path: cannot write checkpoint {re.escape(str(path))} \(File too large\); .*"
    assert re.fullmatch(expected, line)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no .tmp, no checkpoint.prev.pt


class _InterruptWhilePickled:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_interrupt_during_a_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(state(1), path, keep_previous=True)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not a storage fault: it stays an interrupt
        save_checkpoint({"engine": {"epoch": 2}, "x": _InterruptWhilePickled()}, path, keep_previous=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
