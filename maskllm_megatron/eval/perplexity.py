"""Perplexity (``maskllm eval-ppl``), at any TP x PP x DP, under a named protocol
(:mod:`maskllm_megatron.eval.protocols`: how the corpus becomes a token stream, the window length,
the last window).

The scoring, the same under every protocol: the token stream is cut into non-overlapping windows
of ``seq_length`` tokens (the default ``demo`` protocol keeps the last, shorter window; the
literature protocols drop it). Each window is one forward pass; its tokens 1..L-1 are predicted
from the tokens before them *in the same window*, so a window of L tokens contributes L-1
predictions. The reported loss is the mean negative log-likelihood over every predicted token of
every window (not a mean of window means; with whole windows only, the two are equal), and
perplexity is its exponential. This is what Hugging Face's ``model(ids, labels=ids).loss``
computes per window, summed with token weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import verify_model_files
from maskllm_megatron.checkpoint.model import load_sparse_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.data.tokenizer import load_tokenizer
from maskllm_megatron.errors import InputError
from maskllm_megatron.eval.protocols import (
    Protocol,
    describe,
    get_protocol,
    protocol_cut,
    protocol_text,
    protocol_tokens,
)
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.paths import require_path

MODES = ("auto", "dense")


def windows(tokens: torch.Tensor, seq_length: int) -> list[torch.Tensor]:
    """Non-overlapping windows; the tail is kept when it predicts at least one token."""
    if seq_length < 2:
        raise InputError("--seq-length must be at least 2 (a window predicts L-1 tokens)")
    out = [tokens[i:i + seq_length] for i in range(0, len(tokens), seq_length)]
    return [w for w in out if len(w) >= 2]


def mask_padded_vocab(logits: torch.Tensor, true_vocab: int | None) -> torch.Tensor:
    """``logits`` ([..., vocab / TP], this TP rank's slice) with the padded vocabulary rows
    (``true_vocab`` and above) at -inf: a converted model's padding rows are zero, and would
    otherwise take probability mass (and could win an argmax)."""
    if true_vocab is None:
        return logits
    width = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * width
    padded = torch.arange(start, start + width, device=logits.device) >= true_vocab
    return logits.masked_fill(padded, float("-inf"))


def forward_logits(model, batch: torch.Tensor, on_logits) -> None:
    """One forward-only pass of a [b, L] token batch through megatron's schedule (any PP);
    ``on_logits(logits)`` gets the float32 vocab-parallel logits [b, L, vocab / TP] on the last
    stage (it is not called elsewhere). Causal attention: right padding changes no position
    before it."""
    b, length = batch.shape
    positions = torch.arange(length, device=batch.device).expand(b, length)

    def forward_step(data_iterator, model):
        output = model(batch, positions, None)  # [b, L, vocab / TP] on the last stage

        def loss_func(logits):
            on_logits(logits.float())
            return torch.zeros((), device=batch.device), {}

        return output, loss_func

    with torch.no_grad(), cuda_literals():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None,
                                    model=[model], num_microbatches=1, seq_length=length,
                                    micro_batch_size=b, forward_only=True)


def _window_nll(model, batch: torch.Tensor, predicted: torch.Tensor,
                true_vocab: int | None) -> torch.Tensor:
    """Sum of NLL over the predicted positions (``predicted``, [b, L] 0/1) of a [b, L] batch of
    windows; a float64 scalar on the device (zero off the last stage)."""
    labels = torch.zeros_like(batch)
    labels[:, :-1] = batch[:, 1:]
    total = torch.zeros((), dtype=torch.float64, device=batch.device)

    def on_logits(logits):
        nonlocal total
        nll = vocab_parallel_cross_entropy(mask_padded_vocab(logits, true_vocab), labels)
        total = (nll.double() * predicted).sum()

    forward_logits(model, batch, on_logits)
    return total


def perplexity(model, tokens: torch.Tensor, seq_length: int, micro_batch_size: int = 1,
               progress: bool = False, true_vocab_size: int | None = None,
               progress_label: str = "perplexity") -> dict:
    """Mean NLL and perplexity of ``tokens`` under ``model`` (every rank calls this).

    Windows are dealt round-robin over data-parallel ranks; sums are reduced over DP and shared
    along the pipeline, so every rank returns the same numbers. Under sequence parallelism the
    short tail window is padded at its end to a multiple of the TP size; causal attention keeps
    the padding out of every predicted token, and it is not counted.
    """
    model.eval()
    device = distributed.device()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    all_windows = windows(tokens, seq_length)
    if not all_windows:
        raise InputError("the test text has fewer than 2 tokens; give a longer --text")
    full = [w for w in all_windows if len(w) == seq_length][dp_rank::dp]
    tail = [w for w in all_windows if len(w) != seq_length]
    batches = [torch.stack(full[i:i + micro_batch_size])
               for i in range(0, len(full), micro_batch_size)]
    if tail and dp_rank == (len(all_windows) - 1) % dp:
        batches.append(tail[0].unsqueeze(0))
    multiple = ps.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    # DP ranks may run different numbers of passes: passes never communicate across DP
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, predicted tokens
    for batch in tqdm(batches, desc=progress_label, disable=not progress):
        length = batch.shape[1]
        padded = -(-length // multiple) * multiple
        batch = torch.nn.functional.pad(batch.long(), (0, padded - length)).to(device)
        predicted = torch.zeros(batch.shape, dtype=torch.float64, device=device)
        predicted[:, :length - 1] = 1  # the last position would predict the next window
        sums[0] += _window_nll(model, batch, predicted, true_vocab_size)
        sums[1] += predicted.sum()
    if not ps.is_pipeline_last_stage():
        sums[0] = 0  # losses exist on the last stage only
    dist.all_reduce(sums[:1], group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    nll, count = sums.tolist()
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(count),
            "windows": len(all_windows)}


def read_text_tokens(path: str | Path, tokenizer,
                     protocol: Protocol | None = None) -> tuple[torch.Tensor, bool]:
    """The corpus as one token stream under ``protocol`` (default ``demo``: the whole file), and
    whether a BOS starts it."""
    protocol = protocol or get_protocol(None)
    ids, bos = protocol_tokens(protocol_text(path, protocol), tokenizer, protocol)
    # host memory on purpose: a corpus can be large; perplexity() moves each window's batch to
    # the rank's device as it scores it
    return torch.tensor(ids, dtype=torch.long, device="cpu"), bos


@dataclass
class PerplexityReport:
    """Held-out perplexity of one checkpoint under a named protocol (module docstring)."""

    checkpoint: Path
    masks: str  # how its masks were applied: hard (argmax of logits), fixed or dense
    seq_length: int
    windows: int
    tokens: int  # predicted tokens
    loss: float  # mean NLL per predicted token
    ppl: float
    protocol: str = "demo"
    bos: bool = False  # whether a BOS started the token stream
    summary: str = ""  # what ran, in one line (protocols.describe)


def evaluate_checkpoint(args, progress_label: str = "perplexity") -> PerplexityReport:
    """``maskllm eval-ppl`` in the running process group: load a dense, pruned or mask-learned
    checkpoint at the asked TP x PP and measure the perplexity of ``args.text`` under
    ``args.protocol`` (absent or None: ``demo``); ``progress_label`` is what its progress bar
    says."""
    protocol = get_protocol(getattr(args, "protocol", None))
    if args.masks not in MODES:
        raise InputError(f"--masks must be one of {', '.join(MODES)}")
    require_path(args.load, "checkpoint (--load)")
    require_path(args.text, "text file (--text)")
    if args.model_config:
        require_path(args.model_config, "model config (--model-config)")
    layout = distributed.use_layout(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, args.seed, what="eval-ppl")
    path = model_dir(args.load)
    verify_model_files(args.model_config or args.load)
    cfg = ModelConfig.load(args.model_config or args.load)
    seq_length = args.seq_length or protocol.seq_length or cfg.max_sequence_length
    if seq_length > cfg.max_sequence_length:
        if not args.seq_length:
            raise InputError(f"protocol {protocol.name} scores windows of {seq_length} tokens, "
                             f"more than the model's max_sequence_length "
                             f"{cfg.max_sequence_length}; give --seq-length to override it")
        raise InputError(f"--seq-length {seq_length} exceeds the model's "
                         f"max_sequence_length {cfg.max_sequence_length}; give at most that")
    # the text first: a corpus too short for the protocol fails before the model loads
    tokens, bos = read_text_tokens(args.text, load_tokenizer(args.tokenizer or cfg.tokenizer),
                                   protocol)
    tokens = tokens[:protocol_cut(len(tokens), seq_length, protocol)]
    model, applied, _ = load_sparse_model(
        path, cfg, NMPattern(args.N, args.M), args.masks,
        params_dtype=distributed.params_dtype(args, layout.device),
        sequence_parallel=args.sequence_parallel, transformer_impl=args.transformer_impl)
    result = perplexity(model, tokens, seq_length, args.micro_batch_size,
                        progress=args.progress and layout.rank == 0,
                        true_vocab_size=cfg.true_vocab_size, progress_label=progress_label)
    return PerplexityReport(path, applied, seq_length, result["windows"], result["tokens"],
                            result["loss"], result["ppl"], protocol.name, bos,
                            describe(protocol, seq_length, bos))
