"""A training run's directory: ``iter_N`` checkpoints written atomically, the ``latest``
pointer written last, and the run state (``train_state.json``) beside the tensors.

::

    SAVE/latest                      -> iter_0000100 (written after the checkpoint is complete)
    SAVE/iter_0000100/model/         model tensors (dist_checkpointing) + maskllm.json
    SAVE/iter_0000100/optimizer/     Adam moments laid out like their parameters
    SAVE/iter_0000100/train_state.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron.checkpoint.integrity import seal, verify
from maskllm_megatron.checkpoint.safe_load import read_json
from maskllm_megatron.errors import CheckpointError
from maskllm_megatron.model.config import MODEL_FILES

TRAIN_STATE = "train_state.json"
STATE_KEYS = frozenset({"iteration", "pattern", "seed", "optimizer_step"})


def write_checkpoint(root: str | Path, iteration: int, write_tensors, train_state: dict,
                     keep: int = 2) -> Path:
    """Write ``root/iter_N`` atomically on every rank: ``write_tensors(tmp)`` fills a temporary
    directory (collectively), rank 0 adds ``train_state``, renames it into place, then moves the
    ``latest`` pointer and keeps the newest ``keep`` checkpoints."""
    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier left this behind
        for part in ("model", "optimizer"):
            (tmp / part).mkdir(parents=True)
    dist.barrier()
    write_tensors(tmp)
    if rank0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state))
        seal(tmp)  # train_state.json (model/ and optimizer/ have their own checksums)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # written last: the checkpoint is complete
        # the model files only: not the logs, which keep growing, nor ``latest``, which a kill
        # between its move and this seal would leave unmatched (latest_checkpoint checks it)
        seal(root, names=MODEL_FILES)
        for old in sorted(root.glob("iter_???????"))[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_train_state(checkpoint: str | Path) -> dict:
    verify(checkpoint)
    path = Path(checkpoint) / TRAIN_STATE
    state = read_json(path)
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise CheckpointError(f"{path}: not a training run's state (needs {sorted(STATE_KEYS)}); "
                              "the run directory is corrupted, resume from another --save")
    return state


def complete_checkpoints(root: str | Path) -> list[Path]:
    """``root``'s ``iter_NNNNNNN`` directories, oldest first: each is renamed into place only
    when complete (``iter_N.tmp`` is one a save killed midway left behind)."""
    return sorted(d for d in Path(root).glob("iter_???????")
                  if re.fullmatch(r"iter_\d{7}", d.name) and (d / TRAIN_STATE).exists())


def latest_checkpoint(root: str | Path | None) -> Path | None:
    """The newest complete checkpoint of a run directory (``None`` before the first save).

    ``latest`` is moved after the checkpoint's rename, so a run killed between the two has a
    newer complete checkpoint than it names: the newest one wins. ``latest`` is still checked:
    one that does not name an ``iter_N`` or names a checkpoint that is not there is damage,
    and a clear error rather than a guess."""
    if root is None:
        return None
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not re.fullmatch(r"iter_\d{7}", name):
        raise CheckpointError(f"{pointer}: does not name an iter_NNNNNNN checkpoint; the run "
                              "directory is corrupted, write the name of its newest complete "
                              "iter_N into it")
    named = Path(root) / name
    if not (named / TRAIN_STATE).exists():
        raise CheckpointError(f"{pointer} names {name}, which is incomplete or missing; write "
                              "the name of the run's newest complete iter_N into it")
    return complete_checkpoints(root)[-1]


def model_dir(path: str | Path) -> Path:
    """The model checkpoint inside ``path``: a run directory (its latest), an ``iter_N``
    directory, or a model checkpoint itself."""
    path = Path(path)
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / "model"
    if (path / "model" / "metadata.json").exists():
        return path / "model"
    return path
