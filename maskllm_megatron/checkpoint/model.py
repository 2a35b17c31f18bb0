"""Model checkpoints through megatron-core's dist_checkpointing, checked before they load.

Mask logits are stored as sharded tensors of global shape ``[out, in // M, C]`` (fixed masks:
``[out, in // M]``), so a checkpoint saved at one TP x PP layout loads at any other. A small
JSON sidecar records the N:M pattern; loading compares it and every mask tensor's global shape
with the model first, so a wrong pattern or shape is a clear error, and a missing logits entry
is an error rather than a silent re-initialisation. Checkpoints are written by the calling
process alone (:func:`write_sharded`), so a user script needs no ``__main__`` guard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import seal, seal_collective, verify
from maskllm_megatron.checkpoint.safe_load import (
    leaves,
    load_sharded,
    read_json,
    read_tensors_metadata,
)
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.model.build import build_model
from maskllm_megatron.model.layers import (
    MaskSettings,
    assign_layer_ids,
    set_mask_mode,
    sparse_layers,
)
from maskllm_megatron.paths import write_file_atomically

SIDECAR = "maskllm.json"
FORMAT_VERSION = 1
MASK_SUFFIXES = (".mask_logits", ".mask_indices")


def parameter_entries(model) -> dict[int, object]:
    """``id(parameter)`` -> its entry (ShardedTensor or factory) in the model's sharded state
    dict: where an optimizer moment of that parameter goes in a checkpoint."""
    return {id(item.data): item for item in leaves(model.sharded_state_dict())
            if isinstance(getattr(item, "data", None), torch.nn.Parameter)}


def mask_tensor_shapes(sharded_state_dict) -> dict[str, tuple[int, ...]]:
    """Global shape of every mask tensor in a sharded state dict."""
    shapes = {}
    for item in leaves(sharded_state_dict):
        pieces = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        for piece in pieces:
            if isinstance(piece, ShardedTensor) and piece.key.endswith(MASK_SUFFIXES):
                shapes[piece.key] = tuple(piece.global_shape)
    return shapes


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` format, written by this process with torch's own file writer.

    megatron's writer starts a multiprocessing manager with ``spawn`` (which runs a user's
    script again when it has no ``__main__`` guard) and forks a process per file; this writes
    the same tensors, keys and metadata in the caller, one file per rank."""

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                          flatten_state_dict=False))


def write_sharded(sharded_state_dict, path: str | Path) -> None:
    """``dist_checkpointing.save`` without starting a process (:class:`InProcessTorchDistSave`);
    megatron's loader reads the result like any ``torch_dist`` checkpoint. Modules'
    ``_extra_state`` objects are left out: pickled byte items nothing here reads (TE's fp8
    metadata, None for megatron's local modules), so a checkpoint holds tensors only."""
    dist_checkpointing.save(without_extra_state(sharded_state_dict), str(path),
                            sharded_strategy=InProcessTorchDistSave())
    seal_collective(path)  # checksums.json: every rank hashes the files it wrote


def without_extra_state(tree):
    """``tree`` without megatron's ``_extra_state`` ShardedObjects."""
    if isinstance(tree, dict):
        return {name: without_extra_state(value) for name, value in tree.items()
                if not _is_extra_state(value)}
    if isinstance(tree, (list, tuple)):
        return type(tree)(without_extra_state(v) for v in tree if not _is_extra_state(v))
    return tree


def _is_extra_state(item) -> bool:
    return isinstance(item, ShardedObject) and item.key.endswith("_extra_state")


def _pattern_of(model) -> str | None:
    patterns = {str(layer.mask_settings.pattern) for _, layer in sparse_layers(model)}
    if len(patterns) > 1:
        raise InputError(f"model mixes N:M patterns {sorted(patterns)}")
    return patterns.pop() if patterns else None


def save_model(model, path: str | Path, masks_only: bool = False) -> None:
    """Save ``model.sharded_state_dict()`` (weights, biases, mask tensors) and the sidecar.

    ``masks_only``: just the mask tensors (a small checkpoint for ``maskllm train --prior``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sharded = model.sharded_state_dict()
    if masks_only:
        sharded = {str(i): item for i, item in enumerate(leaves(sharded))
                   if str(getattr(item, "key", "")).endswith(MASK_SUFFIXES)}
    write_sharded(sharded, path)
    local = {"pattern": _pattern_of(model), "masks": mask_tensor_shapes(sharded),
             "modes": sorted({layer.mode for _, layer in sparse_layers(model)})}
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    if not dist.is_initialized() or dist.get_rank() == 0:
        patterns = {g["pattern"] for g in gathered if g["pattern"] is not None}
        masks = {k: list(v) for g in gathered for k, v in g["masks"].items()}
        modes = sorted({m for g in gathered for m in g["modes"]})
        sidecar = {"format": FORMAT_VERSION, "pattern": patterns.pop() if patterns else None,
                   "mask_modes": modes,  # "dense": the masks were off (dense training)
                   "mask_tensors": dict(sorted(masks.items()))}
        write_file_atomically(path / SIDECAR, json.dumps(sidecar, indent=1))
        seal(path)  # adds the sidecar to the manifest
    if dist.is_initialized():
        dist.barrier()


def read_sidecar(path: str | Path) -> dict | None:
    """The checkpoint's ``maskllm.json`` (None when it has none)."""
    sidecar = Path(path) / SIDECAR
    if not sidecar.exists():
        return None
    data = read_json(sidecar)
    if not isinstance(data, dict) or not isinstance(data.get("mask_tensors", {}), dict):
        raise CheckpointError(f"{sidecar}: not a maskllm checkpoint description; the checkpoint "
                              "is corrupted, write it again")
    return data


def load_model(model, path: str | Path, missing_masks: str = "error") -> None:
    """Load a checkpoint saved at any parallel layout into ``model`` (this rank's stage, or
    its list of virtual-pipeline chunks: loaded in one call, as the checkpoint is validated
    against every rank's whole request).

    ``missing_masks="error"`` (default) refuses a checkpoint without the model's mask tensors;
    ``"keep"`` loads a dense checkpoint (e.g. converted from Hugging Face) and keeps the
    model's freshly initialised logits. With ``"keep"``, a checkpoint trained with its masks
    off (``--dense``: its mask tensors were never trained) loads into a model of any N:M
    pattern: its mask tensors are ignored when the patterns differ.
    """
    if missing_masks not in ("error", "keep"):
        raise ValueError(f"missing_masks must be 'error' or 'keep', got {missing_masks!r}")
    path = Path(path)
    verify(path, collective=True)
    if not (path / "metadata.json").exists():
        raise CheckpointError(f"{path} is not a megatron-core distributed checkpoint "
                              "(no metadata.json)")
    pattern = _pattern_of(model)
    sidecar = read_sidecar(path)
    other_pattern = bool(sidecar and sidecar.get("pattern") and pattern
                         and sidecar["pattern"] != pattern)
    # masks off while it trained: its mask tensors hold nothing, only its weights count
    masks_unused = missing_masks == "keep" and sidecar and sidecar.get("mask_modes") == ["dense"]
    if other_pattern and not masks_unused:
        raise CheckpointError(f"checkpoint {path} holds {sidecar['pattern']} masks but the "
                              f"model is built for {pattern}")
    chunks = model if isinstance(model, (list, tuple)) else [model]
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    stored = read_tensors_metadata(path)
    missing = []
    for key, shape in mask_tensor_shapes(sharded).items():
        if key not in stored or other_pattern:  # (other_pattern: the masks are unused)
            missing.append(key)
            continue
        found = tuple(stored[key].global_shape)
        if found != shape:
            raise CheckpointError(
                f"checkpoint {path}: {key} has global shape {list(found)} but the model expects "
                f"{list(shape)} for {pattern} (N:M mismatch or a different model)")
    if missing and missing_masks == "error":
        raise CheckpointError(f"checkpoint {path} has no mask tensors for {len(missing)} sparse "
                         f"tensors, e.g. {missing[0]}; pass missing_masks='keep' to start "
                         "mask learning from a dense checkpoint")
    if missing:
        sharded = _drop_keys(sharded, set(missing))
    # modules' ``_extra_state`` (TE's fp8 metadata, None for megatron's local modules) is not
    # requested: a checkpoint written with one transformer implementation (TE on a GPU, local
    # on the CPU) then loads into the other, and no mask-learning run uses fp8
    sharded = _drop_keys(sharded, {str(getattr(item, "key", "")) for item in leaves(sharded)
                                   if str(getattr(item, "key", "")).endswith("_extra_state")})
    state = load_sharded(sharded, path)
    unexpected, absent = [], []
    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(state[f"model{i}"], strict=False)
        unexpected += result.unexpected_keys
        absent += [k for k in result.missing_keys if not k.endswith(MASK_SUFFIXES)
                   and not k.endswith("_extra_state")]
    if unexpected or absent:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {absent[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _drop_keys(tree, keys: set[str]):
    if isinstance(tree, dict):
        out = {}
        for name, value in tree.items():
            item_key = getattr(value, "key", None)
            if item_key in keys:
                continue
            out[name] = _drop_keys(value, keys)
        return out
    return tree


@torch.no_grad()
def global_tensors(model, suffixes=MASK_SUFFIXES, grads: bool = False) -> dict[str, torch.Tensor]:
    """Assemble full (unsharded) tensors of this model (or list of virtual-pipeline chunks)
    across every rank (tests, tools).

    Uses the sharded-state-dict layout, so the result is in the TP-invariant global layout;
    with ``grads=True`` the parameters' gradients are assembled instead.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    pieces = []
    for item in leaves([chunk.sharded_state_dict() for chunk in chunks]):
        if isinstance(item, ShardedTensorFactory):
            if not item.key.endswith(suffixes):
                continue
            data = item.data.grad if grads else item.data
            built = item.build_fn(item.key, data, item.replica_id, item.flattened_range)
        elif isinstance(item, ShardedTensor) and item.key.endswith(suffixes):
            data = item.data.grad if grads else item.data
            built = [(item, data)]
        else:
            continue
        for piece in built:
            sh, tensor = piece if isinstance(piece, tuple) else (piece, piece.data)
            pieces.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                           sh.prepend_axis_num, tensor.detach().cpu().clone()))
    everything = [None] * dist.get_world_size() if dist.is_initialized() else [pieces]
    if dist.is_initialized():
        dist.all_gather_object(everything, pieces)
    out: dict[str, torch.Tensor] = {}
    for rank_pieces in everything:
        for key, shape, offset, prepended, tensor in rank_pieces:
            full = out.setdefault(key, torch.zeros(shape, dtype=tensor.dtype))
            # prepended axes (megatron's stacked-layer axis) are single indices
            index = tuple(offset[:prepended]) + tuple(
                slice(o, o + s) for o, s in zip(offset[prepended:], tensor.shape, strict=True))
            full[index] = tensor
    return out


def checkpoint_mask_mode(path: str | Path) -> str:
    """How a checkpoint's masks are applied: logits -> hard (argmax), indices -> fixed,
    none, or a run with masks off (``--dense`` training) -> dense."""
    sidecar = read_sidecar(path) or {}
    if sidecar.get("mask_modes") == ["dense"]:
        return "dense"
    keys = sidecar.get("mask_tensors", {})
    if any(k.endswith(".mask_logits") for k in keys):
        return "hard"
    if any(k.endswith(".mask_indices") for k in keys):
        return "fixed"
    return "dense"


def load_sparse_model(path: str | Path, cfg, pattern, masks: str = "auto",
                      params_dtype: torch.dtype | None = None, sequence_parallel: bool = False,
                      transformer_impl: str | None = None):
    """Build the model at the current TP x PP on this rank's device and load ``path`` with its
    masks applied: the argmax of learned logits (hard), fixed masks, or none. Returns (model,
    mode, pattern); the pattern recorded in the checkpoint wins over ``pattern``."""
    layout = distributed.current_layout()
    verify(path, names=(SIDECAR,))  # read before load_model verifies the rest
    stored = checkpoint_mask_mode(path)
    recorded = (read_sidecar(path) or {}).get("pattern")
    pattern = NMPattern.parse(recorded) if recorded else pattern
    build_mode = {"hard": "learn", "fixed": "fixed", "dense": "dense"}[stored]
    model = build_model(cfg, MaskSettings(pattern=pattern, mode=build_mode), tp=layout.tp,
                        pp=layout.pp, device=layout.device, params_dtype=params_dtype,
                        sequence_parallel=sequence_parallel, transformer_impl=transformer_impl)
    assign_layer_ids(model)
    load_model(model, path, missing_masks="keep" if stored == "dense" else "error")
    model.eval()
    if stored == "hard":
        set_mask_mode(model, "hard")
    if masks == "dense" or stored == "dense":
        set_mask_mode(model, "dense")
    return model, ("dense" if masks == "dense" else stored), pattern
