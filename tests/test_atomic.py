"""The one atomic writer: umask permissions, fsync of file and folder, the old file kept when a write fails."""

import os
import stat

import pytest
import torch

from trainer import atomic
from trainer.data.cache import FeatureCache


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    expected = {0o022: 0o644, 0o027: 0o640}[umask]
    assert atomic.default_mode() == expected
    path = atomic.atomic_write_json(tmp_path / "run" / "config.json", {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == expected
    # the feature cache's disk entries go through the same writer
    cache = FeatureCache("disk", tmp_path / "cache")
    cache.put("ab" * 32, {"x": torch.ones(2)})
    entry = tmp_path / "cache" / "ab" / f"{'ab' * 32}.safetensors"
    assert stat.S_IMODE(os.stat(entry).st_mode) == expected
    assert torch.equal(cache.get("ab" * 32)["x"], torch.ones(2))
    folder = atomic.atomic_directory(tmp_path / "tok", lambda tmp: (tmp / "vocab.json").write_text("{}"))
    assert stat.S_IMODE(os.stat(folder).st_mode) == {0o022: 0o755, 0o027: 0o750}[umask]
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "run") == []


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = atomic.atomic_write_text(tmp_path / "state.pt", "old")

    def half(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, half)
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["state.pt"]
    atomic.atomic_write_text(path, "new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_a_failed_directory_build_leaves_the_old_folder(tmp_path):
    atomic.atomic_directory(tmp_path / "d", lambda tmp: (tmp / "a").write_text("1"))

    def broken(tmp):
        (tmp / "b").write_text("2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic.atomic_directory(tmp_path / "d", broken)
    assert os.listdir(tmp_path / "d") == ["a"] and sorted(os.listdir(tmp_path)) == ["d"]


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic.atomic_write_bytes(tmp_path / "x.safetensors", b"data")
    assert synced == [False, True]  # the data before the rename, the folder entry after it
