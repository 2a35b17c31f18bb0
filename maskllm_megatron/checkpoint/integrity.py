"""Checksums of every directory this package writes, checked before anything in it is read.

A truncated file can fail a format check, but a flipped bit inside the tensor bytes of a
``.distcp`` or ``.safetensors`` file cannot: it loads as a silently wrong tensor. So each writer
ends with :func:`seal`, which records ``{relative path: {size, sha256}}`` in ``checksums.json``
beside the files, and each loader starts with :func:`verify`, which raises
:class:`CheckpointError` naming the first file whose size or digest differs (or that is gone).
megatron, transformers and TensorRT-LLM ignore the extra file.

* Distributed saves (:func:`seal_collective`): every rank hashes the ``__{rank}_*.distcp`` files
  it wrote, the digests are gathered, rank 0 hashes the rest (``.metadata``, ``common.pt``,
  ``metadata.json``) and writes the manifest (a temporary file renamed into place).
* Files added after that (the ``maskllm.json`` sidecar, ``model_config.json``, the HF config,
  the tokenizer, ``train_state.json``): the writer seals again; entries already listed are kept
  (unless the file was rewritten after the manifest), new files are hashed.
* Subdirectories holding their own manifest (``iter_N/model``, ``iter_N/optimizer``) are left
  to it; ``names`` restricts a manifest to some files (a run directory's model files: not its
  growing logs, nor ``latest``, which moves after each checkpoint and is checked by
  ``run_dir.latest_checkpoint`` instead).
* ``verify(..., collective=True)`` on every rank splits the files over the ranks (file ``i`` on
  rank ``i % world``) and every rank raises the same error.
* A directory without a manifest (another tool's, or an older version's) loads unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maskllm_megatron.errors import CheckpointError

MANIFEST = "checksums.json"
FORMAT_VERSION = 1
ALGORITHM = "sha256"
MODEL_FILES = ("model_config.json", "hf_config.json")
_HEX = re.compile(r"[0-9a-f]{64}")
_ADVICE = "copy or download the checkpoint again"
HASH_THREADS = min(8, os.cpu_count() or 1)  # files hashed at once by one process


def _group():
    """``torch.distributed`` when a process group of several ranks is up, else None. Looked up,
    not imported: a process that never imported torch has no group, and the TensorRT-LLM
    validator (which verifies its directory) stays torch-free."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def file_digest(path: Path) -> str:
    """sha256 of a file, streamed (never read whole into memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, ALGORITHM: file_digest(path)}


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """``{relative path: {size, sha256}}`` from ``directory``'s manifest, None without one; a
    damaged manifest is a :class:`CheckpointError`."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not JSON: {err}); {_ADVICE}") from None
    problem = _manifest_problem(data)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); {_ADVICE}")
    if data["digest"] != _self_digest(data["files"]):
        raise CheckpointError(f"{path} is damaged (its entries do not match its own digest); "
                              f"{_ADVICE}")
    return data["files"]


def _self_digest(files: dict) -> str:
    """sha256 of the entries: a damaged manifest is told from a damaged file it lists."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _manifest_problem(data) -> str | None:
    if not isinstance(data, dict) or set(data) != {"format", "algorithm", "files", "digest"}:
        return "expected the keys format, algorithm, files, digest"
    if data["format"] != FORMAT_VERSION:
        return f"format {data['format']!r}, this version reads {FORMAT_VERSION}"
    if data["algorithm"] != ALGORITHM:
        return f"algorithm {data['algorithm']!r}, expected {ALGORITHM!r}"
    if not isinstance(data["files"], dict) or not isinstance(data["digest"], str):
        return "files is not a mapping"
    for name, entry in data["files"].items():
        parts = Path(name).parts
        if (not name or Path(name).is_absolute() or ".." in parts or name == MANIFEST
                or not isinstance(entry, dict) or set(entry) != {"size", ALGORITHM}
                or type(entry["size"]) is not int or entry["size"] < 0
                or not isinstance(entry[ALGORITHM], str)
                or not _HEX.fullmatch(entry[ALGORITHM])):
            return f"bad entry {name!r}"
    return None


def _write_manifest(directory: Path, files: dict[str, dict]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, "algorithm": ALGORITHM,
                               "files": dict(sorted(files.items())),
                               "digest": _self_digest(files)}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def _candidates(directory: Path, names: Iterable[str] | None) -> list[str]:
    """Relative paths of the files a manifest of ``directory`` covers: every regular file below
    it except the manifest and subdirectories sealed on their own, or the files ``names``
    (files or directories) hold."""
    out = []

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.is_symlink():
                continue
            if child.is_dir():
                if not (child / MANIFEST).exists():
                    walk(child)
            elif child.is_file() and not (folder == directory and child.name in (
                    MANIFEST, MANIFEST + ".tmp")):
                out.append(child.relative_to(directory).as_posix())

    if names is None:
        walk(directory)
        return out
    for name in names:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            if not (path / MANIFEST).exists():
                walk(path)
        elif path.is_file() and not path.is_symlink():
            out.append(name)
    return out


def seal(directory: str | Path, names: Iterable[str] | None = None,
         known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Write (or extend) ``directory``'s manifest, on one process: files it lists and that were
    not rewritten since are kept, the others hashed; files that are gone are dropped.
    ``names``: cover only these files (or directories); ``known``: entries hashed elsewhere
    (other ranks' files). Returns the manifest's entries."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    try:
        old = read_manifest(directory) or {}
        written = manifest.stat().st_mtime_ns if old else 0
    except CheckpointError:
        old, written = {}, 0
    files = {}
    for name in _candidates(directory, names):
        path = directory / name
        if known and name in known:
            files[name] = known[name]
            continue
        stat = path.stat()
        entry = old.get(name)
        # a file changed at (or after) the manifest's time may have been rewritten: hash it
        # (ctime too: a copy that keeps the source's mtime, shutil.copy2, still sets it)
        changed = max(stat.st_mtime_ns, stat.st_ctime_ns)
        if entry is None or entry["size"] != stat.st_size or changed >= written:
            entry = _entry(path)
        files[name] = entry
    for name, entry in {**old, **(known or {})}.items():  # another node's file this listing
        if name not in files and (names is None or name in names) \
                and (directory / name).is_file():  # did not show yet (network filesystems)
            files[name] = entry
    _write_manifest(directory, files)
    return files


def seal_collective(directory: str | Path) -> None:
    """Seal a directory torch's distributed checkpoint writer just filled, on every rank:
    each rank hashes its own ``__{rank}_*.distcp`` files, rank 0 the rest. A fresh manifest
    (entries of an earlier save in the same directory are not trusted)."""
    directory = Path(directory)
    dist = _group()
    if dist is None:
        (directory / MANIFEST).unlink(missing_ok=True)
        seal(directory)
        return
    rank = dist.get_rank()
    mine = {p.name: _entry(p) for p in sorted(directory.glob(f"__{rank}_*.distcp"))}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    outcome = [None]
    if rank == 0:
        try:
            (directory / MANIFEST).unlink(missing_ok=True)
            seal(directory, known={k: v for part in gathered for k, v in part.items()})
        except OSError as err:  # e.g. a full disk: every rank raises it
            outcome[0] = f"cannot write {directory / MANIFEST}: {err}"
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise OSError(outcome[0])


def _check(directory: Path, name: str, entry: dict) -> str | None:
    """Why ``name`` does not match its entry, or None."""
    path = directory / name
    where = f"{directory / name}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return (f"{where} is missing (the checkpoint lists it in {MANIFEST}); the copy is "
                f"incomplete: {_ADVICE}")
    if size != entry["size"]:
        what = "truncated" if size < entry["size"] else "longer than written"
        return (f"{where} is {what}: {size} bytes, {entry['size']} when saved (per {MANIFEST}); "
                f"{_ADVICE}")
    try:
        digest = file_digest(path)
    except OSError as err:
        return f"{where} cannot be read: {err}"
    if digest != entry[ALGORITHM]:
        return (f"{where} is corrupted: its {ALGORITHM} differs from the one recorded when it "
                f"was saved ({MANIFEST}); {_ADVICE}")
    return None


def verify(directory: str | Path, names: Iterable[str] | None = None,
           collective: bool = False) -> None:
    """Check ``directory``'s files against its manifest (nothing without one); raise
    :class:`CheckpointError` naming the first bad file. ``names``: check only these of the
    listed files (or the listed files under these directories). ``collective``: every rank of
    the process group calls this; the files are split over the ranks and every rank raises the
    same error (without a process group it checks alone)."""
    directory = Path(directory)
    files = read_manifest(directory)
    if files is None:
        return
    listed = sorted(files)
    if names is not None:
        wanted = list(names)
        listed = [n for n in listed if any(n == w or n.startswith(w.rstrip("/") + "/")
                                           for w in wanted)]
    dist = _group() if collective else None
    if dist is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        first = None
        for index in range(rank, len(listed), world):
            problem = _check(directory, listed[index], files[listed[index]])
            if problem:
                first = (index, problem)
                break
        outcomes: list = [None] * world
        dist.all_gather_object(outcomes, first)
        found = sorted(o for o in outcomes if o is not None)
        if found:
            raise CheckpointError(found[0][1])
        return
    # one process checks every file: several at once (hashlib releases the GIL while hashing)
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(listed)))) as pool:
        for problem in pool.map(lambda name: _check(directory, name, files[name]), listed):
            if problem:
                raise CheckpointError(problem)


def verify_model_files(*paths: str | Path) -> None:
    """Check ``model_config.json`` and the HF config in each of ``paths`` (a directory or a
    ``model_config.json``) that has a manifest, before they are read."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        verify(path if path.is_dir() else path.parent, names=MODEL_FILES)
