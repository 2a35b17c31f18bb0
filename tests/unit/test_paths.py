"""Output directories are whole or absent (maskllm_megatron.paths), without a process group."""

import pytest

from maskllm_megatron.errors import InputError
from maskllm_megatron.paths import (
    atomic_directory,
    removed_on_failure,
    require_path,
    require_separate,
)


def test_a_finished_directory_replaces_the_old_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        assert tmp == tmp_path / "out.partial" and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyError), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyError("bug")
    assert (out / "old.txt").read_text() == "old" and not (tmp_path / "out.partial").exists()
    deep = tmp_path / "a" / "b" / "out"  # the parents it made go too
    with pytest.raises(InputError), atomic_directory(deep):
        raise InputError("bad input")
    assert not (tmp_path / "a").exists()


def test_a_run_directory_made_by_a_failed_run_is_removed(tmp_path):
    run = tmp_path / "runs" / "x"
    with pytest.raises(InputError), removed_on_failure(run):
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("{}")
        raise InputError("nan")
    assert not (tmp_path / "runs").exists()
    run.mkdir(parents=True)  # an existing one (a resumed run) is kept
    with pytest.raises(InputError), removed_on_failure(run):
        raise InputError("nan")
    assert run.is_dir()
    fresh = tmp_path / "fresh"  # as is one whose run completed a checkpoint
    with pytest.raises(InputError), removed_on_failure(fresh, done=lambda: True):
        fresh.mkdir()
        raise InputError("nan")
    assert fresh.is_dir()


def test_inputs_are_named_and_never_the_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint") as err:
        require_path(tmp_path / "missing", "checkpoint")
    assert err.value.filename == str(tmp_path / "missing")
    assert require_path(tmp_path, "directory") == tmp_path
    require_separate(tmp_path / "out", tmp_path / "in", None)
    for source in (tmp_path / "out", tmp_path / "out" / "model"):
        with pytest.raises(InputError, match="choose another --out"):
            require_separate(tmp_path / "out", source)
