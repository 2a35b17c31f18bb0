"""One-shot N:M baselines (magnitude, Wanda, SparseGPT): masks for tables and priors.

Scores are per weight; every method keeps, in each group of M consecutive input columns, the N
weights with the highest score (:func:`nm.mask_from_scores`, stable ties):

* magnitude: ``|W|``;
* Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||``, with ``X_j`` the j-th input feature over the
  calibration tokens;
* SparseGPT (Frantar & Alistarh 2023): columns are visited left to right in blocks of 128; at the
  start of each group of M columns the M-N weights with the smallest ``w^2 / [H^-1]_jj^2`` are
  pruned, where ``w`` is the weight *after* the optimal-brain-surgeon updates from earlier
  columns, and ``H = 2 X^T X`` damped by 1% of its mean diagonal. The mask therefore depends on
  the updates even when they are not kept: ``update=False`` (the MaskLLM prior setting) returns
  the original weights times the mask, ``update=True`` the updated weights.

:func:`prune_model` runs them layer-sequentially on a megatron model (see there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import seal, verify_model_files
from maskllm_megatron.checkpoint.model import load_model, save_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.core.nm import NMPattern, check_groupable, mask_from_scores, mask_to_indices
from maskllm_megatron.data.datasets import BatchLayout, build_gpt_datasets, parse_blend
from maskllm_megatron.data.tokenizer import load_tokenizer
from maskllm_megatron.errors import InputError
from maskllm_megatron.model.build import build_model, check_seq_length
from maskllm_megatron.model.config import ModelConfig, copy_model_files
from maskllm_megatron.model.layers import (
    MaskSettings,
    assign_layer_ids,
    set_mask_mode,
    sparse_layers,
)
from maskllm_megatron.paths import atomic_directory, require_path, require_separate
from maskllm_megatron.training.step import forward_passes

METHODS = ("magnitude", "wanda", "sparsegpt")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    return method


def magnitude_mask(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    check_groupable(weight.shape, pattern)
    return mask_from_scores(weight.abs(), pattern)


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor,
               pattern: NMPattern) -> torch.Tensor:
    """``input_sq_norms[j] = sum over calibration tokens of X_j^2`` (length ``in``)."""
    check_groupable(weight.shape, pattern)
    if input_sq_norms.shape != weight.shape[1:]:
        raise ValueError(f"Wanda needs one input norm per column ({weight.shape[1]}), got "
                         f"{list(input_sq_norms.shape)}")
    return mask_from_scores(weight.abs().double() * input_sq_norms.double().sqrt(), pattern)


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01,
                            what: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` in float64 (SparseGPT's ``Hinv``).

    Dead inputs (zero diagonal) get a unit diagonal. If the damped matrix is still not positive
    definite, the damping is raised tenfold (with a warning) until it is: never NaN.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    damp = percdamp * (mean_diag if mean_diag > 0 else 1.0)
    for _ in range(12):
        damped = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
        damp *= 10
        warnings.warn(f"{what}: the damped Hessian is not positive definite; raising the "
                      f"damping to {damp:.3g}", RuntimeWarning, stacklevel=2)
    raise RuntimeError(f"{what}: the Hessian stays singular after raising the damping to {damp}")


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, *,
              update: bool = False, blocksize: int = 128, percdamp: float = 0.01,
              what: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M pass. Returns ``(mask, pruned weight)``, the weight in ``weight``'s dtype.

    ``hessian`` is ``X^T X`` (any positive scale) over the layer's input columns.
    """
    check_groupable(weight.shape, pattern)
    m, prune = pattern.m, pattern.m - pattern.n
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{what}: Hessian must be [{cols}, {cols}], got {list(hessian.shape)}")
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={m}")
    w = weight.double().clone()
    w[:, torch.diagonal(hessian) == 0] = 0
    hinv = damped_inverse_cholesky(hessian, percdamp, what)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1)
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i:i + m].square() / diag[i:i + m].square()
                # smallest scores are pruned; stable on ties, like mask_from_scores
                order = torch.sort(score, dim=1, stable=True).indices[:, :prune]
                pruned[:, i1 + i:i1 + i + m].scatter_(1, order, True)
            q = w1[:, i].clone()
            q[pruned[:, i1 + i]] = 0
            e = (w1[:, i] - q) / diag[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    mask = ~pruned
    out = w if update else weight.double() * mask
    return mask, out.to(weight.dtype)


# ----------------------------------------------------------------------------- on a model


class _Statistics:
    """Calibration statistics of one layer's input, accumulated by a forward pre-hook on the
    layer's device in fp32 (as SparseGPT and Wanda do).

    ``gather``: for a row-parallel layer (input split over tensor parallel) the input shards are
    all-gathered, so the Hessian covers every input column and SparseGPT runs on the full
    weight rows exactly as at TP=1. Otherwise each shard keeps the block of the Hessian of its
    own columns (per-shard approximation: no cross-shard updates). Column-parallel layers see
    the full input either way, and SparseGPT treats rows independently: exact. Under sequence
    parallelism a column-parallel layer sees only its TP rank's part of the sequence: the
    statistics, sums over tokens, are summed over TP.
    """

    def __init__(self, layer, method: str, gather: bool):
        self.layer, self.method = layer, method
        self.gather = (gather and method == "sparsegpt" and layer.partition_axis == 1
                       and _tp_size() > 1)  # Wanda's column norms are exact per shard
        self.sequence_split = (layer.partition_axis == 0 and layer.sequence_parallel
                               and _tp_size() > 1)
        self.sum = None
        self.tokens = 0
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.gather:
            x = _all_gather_columns(x)
        stat = x.square().sum(0) if self.method == "wanda" else x.T @ x
        self.sum = stat if self.sum is None else self.sum + stat
        self.tokens += x.shape[0] * (_tp_size() if self.sequence_split else 1)

    def finish(self):
        """Sum over data parallel (each DP rank saw its own calibration samples) and, under
        sequence parallelism, over the TP ranks' parts of the sequence."""
        self.handle.remove()
        if self.sum is None:
            raise RuntimeError(f"{self.layer.kind}: no calibration input reached this layer")
        if self.sequence_split:
            dist.all_reduce(self.sum, group=ps.get_tensor_model_parallel_group())
        dist.all_reduce(self.sum, group=ps.get_data_parallel_group())
        return self.sum


def _tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def _all_gather_columns(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_tp_size())]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def _prune_layer(layer, stat, method: str, gather: bool, update: bool, what: str) -> None:
    """Set the layer's fixed mask (``mask_indices``) and its pruned weight."""
    pattern = layer.mask_settings.pattern
    weight = layer.weight
    if method == "magnitude":
        mask, out = magnitude_mask(weight, pattern), None
    elif method == "wanda":
        mask, out = wanda_mask(weight, stat, pattern), None
    else:
        full = gather and layer.partition_axis == 1 and _tp_size() > 1
        w = _all_gather_columns(weight.double()) if full else weight
        mask, out = sparsegpt(w, stat, pattern, update=update, what=what)
        if full:  # every TP rank ran the same full-row problem: keep this shard's columns
            cols = weight.shape[1]
            start = ps.get_tensor_model_parallel_rank() * cols
            mask, out = mask[:, start:start + cols], out[:, start:start + cols]
        out = out.to(weight.dtype)
    weight.copy_(out if out is not None else weight * mask.to(weight.dtype))
    layer.mask_indices.copy_(mask_to_indices(mask, pattern).to(torch.uint8))
    layer.mode = "fixed"


def prune_model(model, forward_calibration, method: str, *, update: bool = False,
                row_parallel_hessian: str = "gather", progress: bool = True,
                progress_label: str | None = None) -> dict:
    """Prune every sparse layer of ``model`` (built with ``MaskSettings(mode="fixed")``).

    Layer-sequential, as in the SparseGPT and Wanda references: blocks are pruned in order of
    their global layer number, and each block's calibration statistics come from a forward pass
    through the blocks before it *already pruned*. ``forward_calibration()`` runs the calibration
    batches forward on every rank (any TP x PP: every rank joins every pass). The four linears of
    one block share a pass. Returns {"tokens": calibration tokens per pass (this DP rank)}.
    """
    check_method(method)
    if row_parallel_hessian not in ("gather", "shard"):
        raise InputError("--row-parallel-hessian must be gather or shard")
    layers = sparse_layers(model)
    if any(not hasattr(layer, "mask_indices") for _, layer in layers):
        raise ValueError("prune_model needs sparse layers built in fixed mode (mask_indices)")
    set_mask_mode(model, "dense")
    blocks: dict[int, list] = {}
    for name, layer in layers:
        blocks.setdefault(layer.layer_id // 8, []).append((name, layer))
    num_layers = model.config.num_layers
    gather = row_parallel_hessian == "gather"
    tokens = 0
    label = progress_label or f"{method} pruning" + (" with weight update" if update else "")
    for block in tqdm(range(1, num_layers + 1), desc=label, disable=not progress):
        mine = blocks.get(block, [])
        if method == "magnitude":  # needs no data
            for name, layer in mine:
                _prune_layer(layer, None, method, gather, update, name)
            continue
        stats = [(name, layer, _Statistics(layer, method, gather)) for name, layer in mine]
        forward_calibration()
        for name, layer, stat in stats:
            tokens = stat.tokens
            _prune_layer(layer, stat.finish(), method, gather, update, f"block {block} {name}")
    return {"tokens": tokens}


# ----------------------------------------------------------------------------- the command


def save_pruned(model, cfg: ModelConfig, source: Path, out: Path) -> None:
    """``OUT/pruned`` (weights times fixed masks) and ``OUT/masks`` (masks only, for ``train
    --prior``), each with ``source``'s model files: what ``prune`` and ``import-masks`` write.
    Both or neither: the masks are renamed into place first, the pruned model last."""
    with atomic_directory(out / "pruned") as pruned, atomic_directory(out / "masks") as masks:
        save_model(model, pruned)
        save_model(model, masks, masks_only=True)

        def describe() -> None:
            for sub in (pruned, masks):
                copy_model_files(source, sub)
                cfg.save(sub)
                seal(sub)

        distributed.on_rank0(describe)


def available_tokens(data_path: list[str]) -> int:
    """Tokens in the indexed datasets named by ``--data-path`` (blend weights ignored)."""
    prefixes, _ = parse_blend(data_path)
    total = 0
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)  # keep it alive: sequence_lengths views its mmap
        total += int(dataset.sequence_lengths.sum())
        del dataset
    return total


@dataclass
class PruneReport:
    """What one-shot pruning did: the share of weights kept per layer shard, and where the
    pruned model and its masks went."""

    method: str
    pattern: NMPattern
    calibration_tokens: int | None  # per pass per data-parallel rank; None for magnitude
    shards: list[tuple[int, int, str, list[int], float]]  # (pp rank, tp rank, layer, shape, kept)
    pruned: Path
    masks: Path


def prune_checkpoint(args, progress_label: str | None = None) -> PruneReport:
    """``maskllm prune`` in the running process group: build the model at TP x PP, load dense
    weights, prune, save ``SAVE/pruned`` (weights times mask, or updated) and ``SAVE/masks``
    (masks only, for ``train --prior``). ``progress_label``: what the progress bar says
    (default: the method, and whether it updates weights)."""
    method = check_method(args.method)
    pattern = NMPattern(args.N, args.M)
    require_path(args.load, "checkpoint (--load)")
    if args.model_config:
        require_path(args.model_config, "model config (--model-config)")
    if method != "magnitude":
        if not args.data_path:
            raise InputError(f"{method} needs calibration data: give --data-path")
        for prefix in parse_blend(args.data_path)[0]:
            for suffix in (".bin", ".idx"):
                require_path(f"{prefix}{suffix}", "dataset file (run `maskllm preprocess` first)")
    for sub in ("pruned", "masks"):
        require_separate(Path(args.save) / sub, args.load, args.model_config)
    layout = distributed.use_layout(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, args.seed, what="prune")
    verify_model_files(args.model_config or args.load)
    cfg = ModelConfig.load(args.model_config or args.load)
    seq_length = args.seq_length or cfg.max_sequence_length
    if args.sequence_parallel and seq_length % layout.tp:
        raise InputError(f"--sequence-parallel splits the sequence over {layout.tp} TP ranks: "
                         f"--seq-length {seq_length} must be a multiple of it")
    check_seq_length(cfg, seq_length)
    model = build_model(cfg, MaskSettings(pattern=pattern, mode="fixed"), tp=layout.tp,
                        pp=layout.pp, device=layout.device,
                        params_dtype=distributed.params_dtype(args, layout.device),
                        sequence_parallel=args.sequence_parallel,
                        transformer_impl=args.transformer_impl)
    assign_layer_ids(model)
    model.eval()
    load_model(model, model_dir(args.load), missing_masks="keep")

    forward = None
    if method != "magnitude":
        need = args.calib_samples * (seq_length + 1)
        have = available_tokens(args.data_path)
        if have < need:
            raise InputError(f"calibration needs --calib-samples {args.calib_samples} x "
                             f"(--seq-length {seq_length} + 1) = {need} tokens, but "
                             f"{' '.join(args.data_path)} holds {have}; lower --calib-samples "
                             "or give more data")
        tokenizer = load_tokenizer(args.tokenizer or cfg.tokenizer)
        dataset, _, _ = build_gpt_datasets(args.data_path, tokenizer, seq_length, args.seed,
                                           (args.calib_samples, 0, 0), split="100,0,0")
        mbs = args.micro_batch_size
        batches = BatchLayout(mbs, args.calib_samples, layout.dp)
        forward = lambda: forward_passes(model, dataset, batches, seq_length,  # noqa: E731
                                         dp_rank=layout.dp_rank)
    result = prune_model(model, forward, method, update=args.update_weights,
                         row_parallel_hessian=args.row_parallel_hessian,
                         progress=args.progress and layout.rank == 0,
                         progress_label=progress_label)
    out = Path(args.save)
    source = Path(args.model_config or args.load)
    save_pruned(model, cfg, source if source.is_dir() else source.parent, out)
    kept = torch.stack([(layer.weight != 0).double().mean() for _, layer in sparse_layers(model)])
    rows = [(name, list(layer.weight.shape), share) for (name, layer), share in
            zip(sparse_layers(model), kept.tolist(), strict=True)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (layout.tp_rank, layout.pp_rank, rows))
    shards, seen = [], set()
    for tp_rank, pp_rank, layer_rows in gathered:
        if (tp_rank, pp_rank) not in seen:  # data-parallel replicas hold the same shards
            seen.add((tp_rank, pp_rank))
            shards.extend((pp_rank, tp_rank, name, shape, kept) for name, shape, kept in layer_rows)
    return PruneReport(method, pattern, result["tokens"] if forward else None, shards,
                       out / "pruned", out / "masks")
