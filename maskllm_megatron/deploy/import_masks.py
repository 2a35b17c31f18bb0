"""Import published N:M masks into a checkpoint: ``maskllm import-masks``.

Two file layouts, both keyed by Hugging Face parameter names:

* the official MaskLLM ``mask_compressed.npz``: one entry ``<HF name>.mask`` per sparse weight,
  ``np.packbits`` of the flattened boolean mask (high bit first), no shape: the shape is the HF
  weight's, from the model config;
* our ``nm_masks.safetensors`` (``maskllm export hf``), read by
  :func:`maskllm_megatron.deploy.export.load_packed_masks`.

Masks are HF-layout tensors like weights, so the converter's :class:`TensorMapping` takes them
to megatron's (fused QKV per query group, ``[gate; up]``, GPT-2's transposed Conv1D) exactly as
it takes weights. Every entry is checked (present, known, its size, N:M) before anything is
written; the result is what ``maskllm prune`` writes (``OUT/pruned`` and ``OUT/masks``), so
``train --prior OUT/masks``, ``trim``, ``export`` and ``eval-ppl`` take it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import seal, verify_model_files
from maskllm_megatron.checkpoint.model import load_model, save_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.checkpoint.safe_load import read_json, read_tensors_metadata
from maskllm_megatron.core.nm import (
    NMPattern,
    indices_to_mask,
    mask_to_indices,
    nonzeros_per_group,
)
from maskllm_megatron.deploy.export import MASKS_FILE, load_packed_masks
from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.interop.hf import (
    HF_CONFIG,
    TensorMapping,
    architecture,
    hf_config_from_model_config,
)
from maskllm_megatron.model.build import build_model
from maskllm_megatron.model.config import ModelConfig, copy_model_files
from maskllm_megatron.model.layers import MaskSettings, assign_layer_ids, sparse_layers
from maskllm_megatron.paths import atomic_directory, require_path, require_separate
from maskllm_megatron.pruning.oneshot import save_pruned

NPZ_SUFFIX = ".mask"  # the official layout's key: "<HF parameter name>.mask"


def hf_shapes(mapping: TensorMapping, model) -> tuple[dict, dict]:
    """(HF name -> shape of every HF tensor, HF name -> shape of the weights that map onto a
    sparse layer's weight); run on the meta device: nothing is copied."""
    sparse = {f"{name}.weight" for name, _ in sparse_layers(model)}
    state = {k: torch.empty(v.shape, device="meta", dtype=torch.bool if k in sparse else v.dtype)
             for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    every, masked = {}, {}
    for name, t in mapping.to_hf(state.__getitem__):
        every[name] = tuple(t.shape)
        if t.dtype == torch.bool:
            masked[name] = tuple(t.shape)
    return every, masked


def read_npz_masks(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The official ``mask_compressed.npz``: HF name -> bool mask of the HF weight's shape.
    Missing, unknown and wrongly sized entries are errors naming the entry; never unpickles."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable .npz mask file ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: a single array, not an .npz archive of masks")
    with archive:
        keys = set(archive.files)
        wanted = {name + NPZ_SUFFIX: name for name in shapes}
        extra = sorted(keys - set(wanted))
        if extra:
            raise InputError(f"{path}: entry {extra[0]!r} names no sparse weight of this model"
                             f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                             "the masks were made for another model or architecture")
        missing = sorted(set(wanted) - keys)
        if missing:
            raise InputError(f"{path}: no entry {missing[0]!r}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                             "every sparse weight needs a mask")
        masks = {}
        for key, name in wanted.items():
            try:
                bits = archive[key]
            except ValueError as err:  # an object array: refused, never unpickled
                raise CheckpointError(f"{path}: entry {key!r} cannot be read safely ({err})"
                                      ) from None
            shape = shapes[name]
            count = int(np.prod(shape))
            if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-count // 8):
                raise InputError(
                    f"{path}: entry {key!r} holds {bits.size} {bits.dtype} values of shape "
                    f"{list(bits.shape)}; the model's weight {list(shape)} needs "
                    f"{-(-count // 8)} packed bytes (uint8, np.packbits of the flat mask)")
            flat = np.unpackbits(bits, count=count)
            masks[name] = torch.from_numpy(flat.reshape(shape).astype(bool))
    return masks


def read_packed_masks(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Our ``nm_masks.safetensors`` (or its ``export hf`` directory), checked against
    ``shapes`` entry by entry."""
    masks = load_packed_masks(path)
    extra = sorted(set(masks) - set(shapes))
    if extra:
        raise InputError(f"{path}: entry {extra[0]!r} names no sparse weight of this model; the "
                         "masks were made for another model or architecture")
    missing = sorted(set(shapes) - set(masks))
    if missing:
        raise InputError(f"{path}: no entry {missing[0]!r}; every sparse weight needs a mask")
    for name, mask in masks.items():
        if tuple(mask.shape) != shapes[name]:
            raise InputError(f"{path}: entry {name!r} has shape {list(mask.shape)}, the model's "
                             f"weight is {list(shapes[name])}")
    return masks


def check_nm(masks: dict[str, torch.Tensor], pattern: NMPattern, transposed: bool,
             path: Path) -> None:
    """Every mask keeps exactly N of every M along the input dimension; the error names the
    entry and its first bad group."""
    for name, mask in masks.items():
        rows_first = mask.t() if transposed else mask  # GPT-2's Conv1D stores [in, out]
        if rows_first.shape[-1] % pattern.m:
            raise InputError(f"{path}: entry {name!r}: input dimension {rows_first.shape[-1]} "
                             f"is not a multiple of M={pattern.m}")
        kept = nonzeros_per_group(rows_first, pattern)
        bad = (kept != pattern.n).nonzero()
        if len(bad):
            row, group = (int(i) for i in bad[0])
            raise InputError(
                f"{path}: entry {name!r} is not a {pattern} mask: {len(bad)} groups of "
                f"{kept.numel()} do not keep exactly N={pattern.n} of M={pattern.m} (first: row "
                f"{row}, columns {group * pattern.m}..{group * pattern.m + pattern.m - 1} keep "
                f"{int(kept[row, group])}); give its --N/--M")


def to_mcore_masks(mapping: TensorMapping, masks: dict[str, torch.Tensor],
                   shapes_of: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """HF-name masks -> mcore state-dict name -> mask, through the converter's weight mapping
    (tensors it needs that are no masks are stand-ins on the meta device)."""
    def get(name: str) -> torch.Tensor:
        if name in masks:
            return masks[name]
        return torch.empty(shapes_of[name], device="meta")

    return {name: t for name, t in mapping.to_mcore(get) if t.dtype == torch.bool}


MASK_FILE_SUFFIXES = (".npz", ".safetensors")


def is_mask_file(path: str | Path) -> bool:
    """A published mask file (the official ``.npz``, our ``nm_masks.safetensors``, or the
    ``export hf`` directory holding it) rather than a checkpoint directory."""
    path = Path(path)
    return (path.is_file() and path.suffix in MASK_FILE_SUFFIXES) or \
        (path.is_dir() and (path / MASKS_FILE).exists() and not (path / "model_config.json")
         .exists())


def _checked_masks(file: Path, load: Path, pattern: NMPattern, device) -> tuple:
    """Read ``load``'s config, build its model on ``device`` (``"meta"``: no weights) and read
    and check every mask of ``file`` against it, before anything is written.
    Returns (model, cfg, config_dir, source, megatron name -> mask, entries)."""
    require_path(file, "mask file")
    require_path(load, "checkpoint (--load)")
    source = model_dir(load)
    verify_model_files(load, source, source.parent)
    config_dir = next((d for d in (load, source, source.parent)
                       if (d / "model_config.json").exists()), None)
    if config_dir is None:
        raise CheckpointError(f"{load}: no model_config.json beside it; give a directory written "
                              "by `maskllm convert`, `prune`, `train` or `trim`")
    cfg = ModelConfig.load(config_dir)
    hf = read_json(config_dir / HF_CONFIG) if (config_dir / HF_CONFIG).exists() \
        else hf_config_from_model_config(cfg)
    arch = architecture(hf)
    model = build_model(cfg, MaskSettings(pattern=pattern, mode="fixed"),
                        device=device, perform_initialization=False)
    assign_layer_ids(model)
    mapping = TensorMapping(arch, hf, cfg)
    every, shapes = hf_shapes(mapping, model)
    if file.suffix == ".npz":
        masks = read_npz_masks(file, shapes)
    elif file.is_dir() or file.suffix == ".safetensors":
        masks = read_packed_masks(file, shapes)
    else:
        raise InputError(f"{file}: give the official mask_compressed.npz or our "
                         "nm_masks.safetensors (or its `export hf` directory)")
    check_nm(masks, pattern, arch == "gpt2", file)
    return model, cfg, config_dir, source, to_mcore_masks(mapping, masks, every), len(masks)


def _refuse_other_fixed_masks(model, source: Path, mcore: dict, pattern: NMPattern) -> None:
    """A pruned checkpoint's weights are already zero outside its own masks: other masks on
    them would keep zeros, silently. The same masks again are fine."""
    if not any(k.endswith(".mask_indices") for k in read_tensors_metadata(source)):
        return
    for name, layer in sparse_layers(model):
        if not torch.equal(indices_to_mask(layer.mask_indices.long(), pattern).cpu(),
                           mcore[f"{name}.weight"]):
            raise InputError(f"{source} is already pruned (it holds fixed masks) and {name}'s "
                             "differ from the imported ones; import onto the dense checkpoint "
                             "it came from (the `maskllm convert` output)")


@torch.no_grad()
def import_masks(file: str | Path, load: str | Path, save: str | Path, n: int = 2,
                 m: int = 4) -> dict:
    """``maskllm import-masks``: masks from ``file`` (official ``.npz`` or our packed
    safetensors) as fixed masks on ``load``'s weights, saved like ``prune`` does
    (``SAVE/pruned``, ``SAVE/masks``). At TP=1 x PP=1 in the running process group (the
    result reshards on load). Returns {"pruned", "masks", "entries", "pattern"}."""
    file, load, save = Path(file), Path(load), Path(save)
    pattern = NMPattern(n, m)
    for sub in ("pruned", "masks"):
        require_separate(save / sub, load, file)
    layout = distributed.use_layout(1, 1, what="import-masks")
    model, cfg, config_dir, source, mcore, entries = _checked_masks(file, load, pattern,
                                                                    layout.device)
    # every check passed: load the weights and mask them (like prune without weight updates)
    load_model(model, source, missing_masks="keep")
    _refuse_other_fixed_masks(model, source, mcore, pattern)
    for name, layer in sparse_layers(model):
        mask = mcore[f"{name}.weight"].to(layer.weight.device)
        layer.mask_indices.copy_(mask_to_indices(mask, pattern).to(torch.uint8))
        layer.weight.mul_(mask.to(layer.weight.dtype))
        layer.mode = "fixed"
    save_pruned(model, cfg, config_dir, save)
    return {"pruned": save / "pruned", "masks": save / "masks", "entries": entries,
            "pattern": pattern}


@torch.no_grad()
def import_prior(file: str | Path, load: str | Path, out: str | Path, n: int = 2,
                 m: int = 4) -> dict:
    """Masks from ``file`` as a masks-only checkpoint ``out`` for ``train --prior`` (what
    ``import-masks`` writes as ``SAVE/masks``), without reading or holding the weights: the
    model is built on the meta device and only its mask tensors are real. Returns
    {"masks", "entries", "pattern"}."""
    file, load, out = Path(file), Path(load), Path(out)
    pattern = NMPattern(n, m)
    require_separate(out, load, file)
    layout = distributed.use_layout(1, 1, what="import-masks")
    model, cfg, config_dir, _, mcore, entries = _checked_masks(file, load, pattern, "meta")
    for name, layer in sparse_layers(model):
        indices = mask_to_indices(mcore[f"{name}.weight"], pattern).to(torch.uint8)
        layer.register_buffer("mask_indices", indices.to(layout.device))
        layer._mark_sharded(layer.mask_indices)
    with atomic_directory(out) as tmp:
        save_model(model, tmp, masks_only=True)

        def describe() -> None:
            copy_model_files(config_dir, tmp)
            cfg.save(tmp)
            seal(tmp)

        distributed.on_rank0(describe)
    return {"masks": out, "entries": entries, "pattern": pattern}
