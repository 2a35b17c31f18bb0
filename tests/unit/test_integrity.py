"""checksums.json: sealing a directory, re-sealing it after more files, and every kind of damage
verify must name (truncated, corrupted, missing, a damaged manifest)."""

import json
import os
import time

import pytest

from maskllm_megatron.checkpoint import integrity
from maskllm_megatron.checkpoint.integrity import MANIFEST, read_manifest, seal, verify
from maskllm_megatron.errors import CheckpointError, UserError


def _directory(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(5000))
    (d / ".metadata").write_bytes(b"meta" * 10)
    (d / "sub" / "tok.json").write_text('{"a": 1}')
    return d


def test_seal_lists_every_file_with_size_and_sha256(tmp_path):
    d = _directory(tmp_path)
    files = seal(d)
    assert sorted(files) == [".metadata", "__0_0.distcp", "sub/tok.json"]
    data = json.loads((d / MANIFEST).read_text())
    assert data["format"] == 1 and data["algorithm"] == "sha256"
    assert data["files"]["__0_0.distcp"]["size"] == 5000
    assert data["files"][".metadata"]["sha256"] == integrity.file_digest(d / ".metadata")
    verify(d)
    verify(d, collective=True)  # no process group: checks alone


def test_resealing_keeps_entries_hashes_new_and_rewritten_files(tmp_path, monkeypatch):
    d = _directory(tmp_path)
    seal(d)
    time.sleep(0.01)
    (d / "maskllm.json").write_text("{}")
    (d / ".metadata").write_bytes(b"new!" * 10)  # same size, rewritten after the seal
    hashed = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: hashed.append(p.name) or real(p))
    files = seal(d)
    assert sorted(hashed) == [".metadata", "maskllm.json"]  # the .distcp is not hashed again
    assert "maskllm.json" in files
    verify(d)
    (d / "maskllm.json").unlink()
    assert "maskllm.json" not in seal(d)  # a file the writer removed is dropped


def test_subdirectories_with_their_own_manifest_and_names(tmp_path):
    d = _directory(tmp_path)
    seal(d / "sub")
    (d / "train_state.json").write_text("{}")
    assert "sub/tok.json" not in seal(d)
    (d / "log.jsonl").write_text("growing")
    assert sorted(seal(d, names=("train_state.json", "sub", "absent"))) == ["train_state.json"]
    (d / "sub" / "tok.json").write_text('{"a": 2}')
    verify(d)  # sub/ is left to its own manifest
    with pytest.raises(CheckpointError, match="tok.json is corrupted"):
        verify(d / "sub")


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "remove"])
def test_damage_is_a_checkpoint_error_naming_the_file(tmp_path, damage):
    d = _directory(tmp_path)
    seal(d)
    target = d / "__0_0.distcp"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[:1234])
        match = "__0_0.distcp is truncated: 1234 bytes, 5000 when saved"
    elif damage == "flip":
        data[4321] ^= 0x10
        target.write_bytes(bytes(data))
        match = "__0_0.distcp is corrupted"
    elif damage == "extend":
        target.write_bytes(bytes(data) + b"x")
        match = "__0_0.distcp is longer than written"
    else:
        target.unlink()
        match = "__0_0.distcp is missing"
    with pytest.raises(CheckpointError, match=match) as err:
        verify(d)
    assert isinstance(err.value, UserError) and "again" in str(err.value)
    verify(d, names=(".metadata",))  # only the files asked for
    with pytest.raises(CheckpointError):
        verify(d, names=("__0_0.distcp",))


def test_extra_files_and_directories_without_manifest_are_fine(tmp_path):
    d = _directory(tmp_path)
    verify(d)  # no manifest: loads as before
    seal(d)
    (d / "notes.txt").write_text("added by hand")
    verify(d)


@pytest.mark.parametrize("text", [
    "", "{", "[]", '{"format": 1, "algorithm": "sha256"}',
    '{"format": 2, "algorithm": "sha256", "files": {}}',
    '{"format": 1, "algorithm": "md5", "files": {}}',
    '{"format": 1, "algorithm": "sha256", "files": {"a": {"size": -1, "sha256": "' + "0" * 64
    + '"}}}',
    '{"format": 1, "algorithm": "sha256", "files": {"../a": {"size": 1, "sha256": "' + "0" * 64
    + '"}}}',
    '{"format": 1, "algorithm": "sha256", "files": {"a": {"size": 1, "sha256": "xyz"}}}',
    b'\xff\xfe{}'])
def test_a_damaged_manifest_is_a_checkpoint_error(tmp_path, text):
    d = _directory(tmp_path)
    seal(d)
    path = d / MANIFEST
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is damaged"):
        verify(d)
    with pytest.raises(CheckpointError):
        read_manifest(d)
    seal(d)  # a writer replaces a damaged manifest
    verify(d)


def test_hashing_streams(tmp_path, monkeypatch):
    """No whole-file read: hashlib.file_digest reads in chunks."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    calls = []
    real = integrity.hashlib.file_digest
    monkeypatch.setattr(integrity.hashlib, "file_digest",
                        lambda f, name: calls.append(name) or real(f, name))
    assert integrity.file_digest(big) == integrity.hashlib.sha256(bytes(64 << 20)).hexdigest()
    assert calls == ["sha256"]


def test_an_edited_entry_is_told_from_a_damaged_file(tmp_path):
    """The manifest carries a digest of its own entries: a changed size or sha256 in it is
    reported as a damaged manifest, not as a damaged file."""
    d = _directory(tmp_path)
    seal(d)
    data = json.loads((d / MANIFEST).read_text())
    data["files"][".metadata"]["size"] += 1
    (d / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is damaged .*own digest"):
        verify(d)


def test_a_file_replaced_by_a_copy_keeping_an_old_mtime_is_hashed_again(tmp_path):
    import shutil

    d = _directory(tmp_path)
    source = tmp_path / "other.json"
    source.write_text('{"b": 2}')
    os.utime(source, ns=(1, 1))  # older than any manifest
    (d / "model_config.json").write_text('{"a": 1}')
    seal(d)
    time.sleep(0.01)
    shutil.copy2(source, d / "model_config.json")  # same size, the source's old mtime
    seal(d)
    verify(d)
