"""Which checkpoint a run resumes from: the newest complete ``iter_N``, with ``latest`` checked."""

import json

import pytest

from maskllm_megatron.checkpoint.run_dir import TRAIN_STATE, latest_checkpoint
from maskllm_megatron.errors import CheckpointError


def _checkpoint(root, iteration, complete=True, suffix=""):
    path = root / f"iter_{iteration:07d}{suffix}"
    path.mkdir(parents=True)
    if complete:
        (path / TRAIN_STATE).write_text(json.dumps({"iteration": iteration}))
    return path


def test_a_run_without_latest_starts_afresh(tmp_path):
    _checkpoint(tmp_path, 1)
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(None) is None


def test_latest_names_the_checkpoint_to_resume(tmp_path):
    _checkpoint(tmp_path, 1)
    newest = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 3, complete=False, suffix=".tmp")  # a save killed midway
    (tmp_path / "latest").write_text(newest.name)
    assert latest_checkpoint(tmp_path) == newest


def test_a_kill_between_the_rename_and_the_pointer_resumes_from_the_newer(tmp_path):
    older = _checkpoint(tmp_path, 1)
    newer = _checkpoint(tmp_path, 2)  # renamed into place; the pointer was not moved yet
    (tmp_path / "latest").write_text(older.name)
    assert latest_checkpoint(tmp_path) == newer


@pytest.mark.parametrize("content", ["iter_00000x2", "", "iter_0000009", b"\xff\xfe"])
def test_a_damaged_pointer_is_an_error_naming_it(tmp_path, content):
    _checkpoint(tmp_path, 2)
    pointer = tmp_path / "latest"
    if isinstance(content, bytes):
        pointer.write_bytes(content)
    else:
        pointer.write_text(content)
    with pytest.raises(CheckpointError, match="latest"):
        latest_checkpoint(tmp_path)
