"""Perplexity, one pinned protocol (``maskllm eval-ppl``), at any TP x PP x DP.

The protocol: the test text is tokenised whole (one token stream, no BOS/EOS inserted), cut into
non-overlapping windows of ``seq_length`` tokens, the last, shorter window kept. Each window is
one forward pass; its tokens 1..L-1 are predicted from the tokens before them *in the same
window*, so a window of L tokens contributes L-1 predictions. The reported loss is the mean
negative log-likelihood over every predicted token of every window (not a mean of window means),
and perplexity is its exponential. This is what Hugging Face's ``model(ids, labels=ids).loss``
computes per window, summed with token weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

MODES = ("auto", "dense")


def forward_passes(model, dataset, batches, seq_length: int, iterations: int = 1,
                   dp_rank: int = 0) -> list[float]:
    """Forward-only over ``iterations`` global batches through megatron's schedule (any PP);
    returns the LM losses of the micro-batches on the last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .data.datasets import batch_for

    losses: list[float] = []
    for it in range(iterations):
        counter = iter(range(batches.num_microbatches))

        def forward_step(data_iterator, model, it=it, counter=counter):
            batch = batch_for(dataset, batches, it, next(counter), dp_rank)
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()

            def loss_func(output_tensor):
                loss = (output_tensor.float() * mask).sum() / mask.sum()
                return loss, {"lm loss": loss.detach().clone()}

            return output, loss_func

        with torch.no_grad():
            result = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[model],
                num_microbatches=batches.num_microbatches, seq_length=seq_length,
                micro_batch_size=batches.micro_batch_size, forward_only=True)
        losses.extend(float(d["lm loss"]) for d in result or [])
    return losses


def windows(tokens: torch.Tensor, seq_length: int) -> list[torch.Tensor]:
    """Non-overlapping windows; the tail is kept when it predicts at least one token."""
    if seq_length < 2:
        raise ValueError("--seq-length must be at least 2 (a window predicts L-1 tokens)")
    out = [tokens[i:i + seq_length] for i in range(0, len(tokens), seq_length)]
    return [w for w in out if len(w) >= 2]


def _window_nll(model, batch: torch.Tensor, true_vocab: int | None) -> tuple[float, int]:
    """Sum of NLL over the predicted tokens of a [b, L] batch of windows (last stage only).

    Logits of padded vocabulary rows (``true_vocab`` and above) are excluded from the softmax:
    a converted model's padding rows are zero, and would otherwise take probability mass."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    b, length = batch.shape
    labels = torch.zeros_like(batch)
    labels[:, :-1] = batch[:, 1:]
    mask = torch.ones(b, length)
    mask[:, -1] = 0  # the last position would predict the next window's first token
    positions = torch.arange(length).expand(b, length)
    sums: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(batch, positions, None)  # [b, L, vocab / TP] on the last stage

        def loss_func(logits):
            logits = logits.float()
            if true_vocab is not None:
                width = logits.shape[-1]
                start = ps.get_tensor_model_parallel_rank() * width
                padded = torch.arange(start, start + width) >= true_vocab
                logits = logits.masked_fill(padded, float("-inf"))
            nll = vocab_parallel_cross_entropy(logits, labels)
            total = (nll.double() * mask).sum()
            sums.append(total.detach())
            return total.float(), {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None,
                                    model=[model], num_microbatches=1, seq_length=length,
                                    micro_batch_size=b, forward_only=True)
    return float(sum(sums)) if sums else 0.0, int(mask.sum())


def perplexity(model, tokens: torch.Tensor, seq_length: int, micro_batch_size: int = 1,
               progress: bool = False, true_vocab_size: int | None = None) -> dict:
    """Mean NLL and perplexity of ``tokens`` under ``model`` (every rank calls this).

    Windows are dealt round-robin over data-parallel ranks; sums are reduced over DP and shared
    along the pipeline, so every rank returns the same numbers.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    model.eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    all_windows = windows(tokens, seq_length)
    if not all_windows:
        raise ValueError("the test text has fewer than 2 tokens")
    full = [w for w in all_windows if len(w) == seq_length][dp_rank::dp]
    tail = [w for w in all_windows if len(w) != seq_length]
    batches = [torch.stack(full[i:i + micro_batch_size])
               for i in range(0, len(full), micro_batch_size)]
    if tail and dp_rank == (len(all_windows) - 1) % dp:
        batches.append(tail[0].unsqueeze(0))
    # DP ranks may run different numbers of passes: passes never communicate across DP
    nll, count = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for batch in tqdm(batches, desc="perplexity", disable=not progress):
        total, predicted = _window_nll(model, batch.long(), true_vocab_size)
        nll += total
        count += predicted
    if not ps.is_pipeline_last_stage():
        nll.zero_()  # losses exist on the last stage only
    dist.all_reduce(nll, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(nll, group=ps.get_data_parallel_group())
    dist.all_reduce(count, group=ps.get_data_parallel_group())
    loss = float(nll) / float(count)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(count),
            "windows": len(all_windows)}


def read_text_tokens(path: str | Path, tokenizer) -> torch.Tensor:
    """The whole file as one token stream."""
    text = Path(path).read_text(encoding="utf-8")
    return torch.tensor(tokenizer.tokenize(text), dtype=torch.long)


def checkpoint_mask_mode(path: str | Path) -> str:
    """How a checkpoint's masks are applied: logits -> hard (argmax), indices -> fixed,
    none, or a run with masks off (``--dense`` training) -> dense."""
    from .checkpoint import read_sidecar

    sidecar = read_sidecar(path) or {}
    if sidecar.get("mask_modes") == ["dense"]:
        return "dense"
    keys = sidecar.get("mask_tensors", {})
    if any(k.endswith(".mask_logits") for k in keys):
        return "hard"
    if any(k.endswith(".mask_indices") for k in keys):
        return "fixed"
    return "dense"


def load_sparse_model(path: str | Path, cfg, pattern, seed: int = 1234,
                      masks: str = "auto"):
    """Build the model at the current TP x PP and load ``path`` with its masks applied: the
    argmax of learned logits (hard), fixed masks, or none. Returns (model, mode, pattern); the
    pattern recorded in the checkpoint wins over ``pattern``."""
    from .checkpoint import load_model, read_sidecar
    from .layers import MaskSettings, SamplingState, attach_sampling, set_mask_mode
    from .nm import NMPattern
    from .runtime import current_layout
    from .spec import build_gpt_model

    layout = current_layout()
    stored = checkpoint_mask_mode(path)
    recorded = (read_sidecar(path) or {}).get("pattern")
    pattern = NMPattern.parse(recorded) if recorded else pattern
    build_mode = {"hard": "learn", "fixed": "fixed", "dense": "dense"}[stored]
    model = build_gpt_model(
        cfg.transformer_config(layout.tp, layout.pp), cfg.vocab_size, cfg.max_sequence_length,
        MaskSettings(pattern=pattern, mode=build_mode),
        position_embedding_type=cfg.position_embedding_type,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        rotary_base=cfg.rotary_base, rotary_percent=cfg.rotary_percent)
    attach_sampling(model, SamplingState(seed=seed), init_logits=False)
    load_model(model, path, missing_masks="keep" if stored == "dense" else "error")
    model.eval()
    if stored == "hard":
        set_mask_mode(model, "hard")
    if masks == "dense" or stored == "dense":
        set_mask_mode(model, "dense")
    return model, ("dense" if masks == "dense" else stored), pattern


def run_eval_ppl(args) -> dict:
    """``maskllm eval-ppl``: load a dense, pruned or mask-learned checkpoint and report PPL."""
    from . import runtime
    from .data.tokenizer import load_tokenizer
    from .model_config import ModelConfig
    from .nm import NMPattern
    from .train import model_dir

    if args.masks not in MODES:
        raise ValueError(f"--masks must be one of {', '.join(MODES)}")
    layout = runtime.init_distributed(args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, args.seed)
    path = model_dir(args.load)
    cfg = ModelConfig.load(args.model_config or args.load)
    seq_length = args.seq_length or cfg.max_sequence_length
    if seq_length > cfg.max_sequence_length:
        raise ValueError(f"--seq-length {seq_length} exceeds the model's "
                         f"max_sequence_length {cfg.max_sequence_length}")
    model, applied, _ = load_sparse_model(path, cfg, NMPattern(args.N, args.M), args.seed,
                                          args.masks)
    tokenizer = load_tokenizer(args.tokenizer or cfg.tokenizer)
    tokens = read_text_tokens(args.text, tokenizer)
    result = perplexity(model, tokens, seq_length, args.micro_batch_size,
                        progress=args.progress and layout.rank == 0,
                        true_vocab_size=cfg.true_vocab_size)
    result.update(masks=applied, seq_length=seq_length)
    if layout.rank == 0:
        print(f"{'checkpoint':<40} {'masks':<7} {'windows':>7} {'tokens':>8} {'loss':>9} "
              f"{'ppl':>10}")
        print(f"{str(path)[-40:]:<40} {applied:<7} {result['windows']:>7} {result['tokens']:>8}"
              f" {result['loss']:.7f} {result['ppl']:10.4f}")
    return result
