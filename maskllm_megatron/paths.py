"""The paths a command reads and the directories it writes.

Output directories are whole or absent: a command writes under a temporary sibling and
renames it into place when everything is written, so a failed run (a user error, a crash, a
kill) never leaves a half-written output, and never harms the directory it would replace.

Every rank of a process group calls these together (a collective checkpoint save writes from
every rank): rank 0 makes, renames and removes; the others wait for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron.errors import InputError

PARTIAL = ".partial"
NOT_A_DIRECTORY = "exists and is not a directory; choose another output directory"


def _ranks() -> tuple[bool, bool]:
    """(whether this rank does the file work, whether there are other ranks to wait for)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True, False
    return dist.get_rank() == 0, True


def _agreed(fn) -> None:
    """``fn()`` on rank 0; its error is raised on every rank (as ``distributed.on_rank0``)."""
    main, many = _ranks()
    box: list = [None]
    if main:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[0] = err
    if many:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def _missing_ancestors(path: Path) -> list[Path]:
    """``path``'s ancestors that do not exist yet, nearest first: made for the output, removed
    with it on failure."""
    made = []
    for parent in path.parents:
        if parent.exists():
            break
        made.append(parent)
    return made


def _remove_made(tmp: Path, made: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in made:  # nearest first; only what this run made and left empty
        with contextlib.suppress(OSError):
            parent.rmdir()


def replace_directory(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` to ``out``; an existing ``out`` is replaced only once ``tmp``
    is in place beside it (renamed aside first, removed last)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, NOT_A_DIRECTORY, str(out))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` (``OUT.partial``) to write into; when the
    block finishes, it becomes ``out`` (replacing an existing one); when it raises, it is
    removed together with the parent directories it made, and ``out`` is left as it was.

    Called by every rank of the running process group (or with none): rank 0 makes, renames
    and removes the directory, the others wait for it, and an error on rank 0 reaches all."""
    out = Path(out).absolute()  # "." has no name to put a sibling beside
    tmp = out.with_name(out.name + PARTIAL)
    main, many = _ranks()
    made = _missing_ancestors(tmp) if main else []

    def make() -> None:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, NOT_A_DIRECTORY, str(out))
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed earlier
        tmp.mkdir(parents=True)

    _agreed(make)
    try:
        yield tmp
        if many:
            dist.barrier()  # every rank's files are in tmp
        _agreed(lambda: replace_directory(tmp, out))
    except BaseException:
        if main:
            _remove_made(tmp, made)
        raise


@contextlib.contextmanager
def removed_on_failure(directory: str | Path | None, done=lambda: False) -> Iterator[None]:
    """For a directory a long run fills in place (a training run's ``--save``): when the block
    raises and the directory did not exist before it and ``done()`` is false (no checkpoint was
    completed), rank 0 removes it, so a run that failed early leaves nothing behind. An
    existing directory is never removed."""
    if directory is None:
        yield
        return
    directory = Path(directory)
    main, _ = _ranks()
    made = _missing_ancestors(directory / "x") if main else []
    try:
        yield
    except BaseException:
        if main and made and not done():
            _remove_made(made[0], made[1:])
        raise


def write_file_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) under a temporary sibling and rename it into place,
    so a reader never sees half a file and a failed write leaves the old one; called on one
    rank (``distributed.on_rank0``)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a file name for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def require_path(path: str | Path | None, what: str) -> Path:
    """``path`` as a Path; a missing one is a :class:`FileNotFoundError` naming it and what it
    should have been (the CLI prints it as a user error), before anything is built."""
    if path is None or not Path(path).exists():
        raise FileNotFoundError(2, f"no such {what} (check the path)", str(path))
    return Path(path)


def require_separate(out: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an output directory that is, or holds, one of the command's inputs: writing it
    would replace what is being read."""
    target = Path(out).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if source == target or target in source.parents:
            raise InputError(f"the output directory {out} would replace the input {source}; "
                             "choose another --out")
