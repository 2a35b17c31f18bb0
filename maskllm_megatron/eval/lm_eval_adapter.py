"""lm-evaluation-harness's ``LM`` interface on our megatron model, at any TP x PP x DP.

Imported only when lm_eval is installed (``maskllm_megatron[eval]``; :mod:`.tasks` checks).
Requests are tokenised exactly as lm-eval's own ``hf`` model (``HFLM``) tokenises them (the
same ``_encode_pair``, BOS handling, left truncation to ``max_length`` and rolling windows), so
per-item log-likelihoods agree with ``HFLM`` on the same weights. Every model-parallel (TP x PP)
peer serves the same requests in lockstep; lm-eval's ``rank``/``world_size`` are the
data-parallel ones, and its gathers run over the data-parallel group.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, _add_special_kwargs, has_bos_prefix
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.errors import InputError
from maskllm_megatron.eval.perplexity import forward_logits, mask_padded_vocab


class SentencePieceTokenizer:
    """The few tokenizer methods lm-eval's adapters call, on a SentencePiece ``.model`` (a
    checkpoint trained here rather than converted): BOS first when the model has one, as
    LLaMA's Hugging Face tokenizer adds it."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name_or_path = str(path)
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.bos_token = (self.sp.id_to_piece(self.bos_token_id)
                          if self.bos_token_id is not None else None)
        self.eos_token = self.sp.id_to_piece(self.eos_token_id)
        self.pad_token = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.sp.encode(text, add_bos=add_special_tokens and self.bos_token_id is not None)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """As Hugging Face's decode: special tokens as their pieces unless skipped."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                run = []
                out.append("" if skip_special_tokens else self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)


def load_lm_tokenizer(path: str | Path | None):
    """The tokenizer lm-eval's ``hf`` model would use for this checkpoint: a Hugging Face
    directory through ``AutoTokenizer`` (fast, as HFLM's default), or a SentencePiece model."""
    if path is None:
        raise InputError("no tokenizer: the model config names none; give --tokenizer")
    path = Path(path)
    if path.is_dir():
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if path.suffix == ".model" and path.is_file():
        return SentencePieceTokenizer(path)
    raise InputError(f"tokenizer {path} not found or not supported: give a SentencePiece "
                     "'.model' file or a Hugging Face tokenizer directory")


class MegatronLM(TemplateLM):
    """A loaded megatron model (sparse or dense; masks as loaded) as an lm-eval ``LM``.

    ``max_length``: the longest input (default: the model's max sequence length); longer
    requests lose tokens on the left, as in HFLM. ``true_vocab_size``: logits of padded
    vocabulary rows are left out of every softmax and argmax."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 1,
                 true_vocab_size: int | None = None, max_gen_toks: int = 256,
                 progress: bool = False, model_info: dict | None = None):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size
        self.true_vocab_size = true_vocab_size
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = None  # HFLM's default: the tokenizer's own choice
        self.progress = progress
        self.model_info = model_info or {}
        self._device = distributed.device()
        self._rank = ps.get_data_parallel_rank()
        self._world_size = ps.get_data_parallel_world_size()
        self.batch_sizes: dict = {}

    # ----------------------------------------------------------------- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS: what conditions an empty context (HFLM's choice)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        return dict(self.model_info)

    # ------------------------------------------------ the data-parallel group, for lm-eval

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=ps.get_data_parallel_group())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, obj, group=ps.get_data_parallel_group())
        return parts if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=ps.get_data_parallel_group())

    # ------------------------------------------------------------ tokenisation (as HFLM)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """HFLM.tok_encode: the tokenizer's special tokens unless told otherwise, none when the
        text already starts with BOS."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------ scoring

    def _pad_multiple(self) -> int:
        return (ps.get_tensor_model_parallel_world_size()
                if self.model.config.sequence_parallel else 1)

    def _score(self, rows: list[list[int]],
               spans: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass of ``rows`` (input tokens, right-padded together); for each row's
        span ``(start, targets)``, targets[k] being the token after position start + k: the
        summed log-prob of the targets and whether greedy decoding gives them all. The same
        on every rank."""
        length = max(len(r) for r in rows)
        multiple = self._pad_multiple()
        length = -(-length // multiple) * multiple
        b = len(rows)
        batch = torch.zeros((b, length), dtype=torch.long, device=self._device)
        labels = torch.zeros((b, length), dtype=torch.long, device=self._device)
        scored = torch.zeros((b, length), dtype=torch.bool, device=self._device)
        for i, (row, (start, targets)) in enumerate(zip(rows, spans, strict=True)):
            batch[i, :len(row)] = torch.tensor(row, dtype=torch.long, device=self._device)
            target_ids = torch.tensor(targets, dtype=torch.long, device=self._device)
            labels[i, start:start + len(targets)] = target_ids
            scored[i, start:start + len(targets)] = True
        out = torch.zeros((b, 2), dtype=torch.float64, device=self._device)

        def on_logits(logits):
            logits = mask_padded_vocab(logits, self.true_vocab_size)
            greedy = vocab_parallel_argmax(logits)
            logprob = -vocab_parallel_cross_entropy(logits.clone(), labels)
            out[:, 0] = (logprob.double() * scored).sum(dim=1)
            out[:, 1] = ((greedy == labels) | ~scored).all(dim=1).double()

        forward_logits(self.model, batch, on_logits)
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the last stage's numbers to all
            dist.all_reduce(out, group=ps.get_pipeline_model_parallel_group())
        return [(s, bool(g)) for s, g in out.tolist()]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's (tokenise as HFLM, then :meth:`_loglikelihood_tokens`), its tokenising
        bar shown only where ours is."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """HFLM's batching (longest first) and left truncation: a request scores its
        continuation tokens given ``(context + continuation)[-(max_length + 1):][:-1]``."""

        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        ordered = Collator(requests, sort_fn=longest_first, group_by=None)
        results = []
        show = self.progress and not disable_tqdm and dist.get_rank() == 0
        with tqdm(total=len(requests), disable=not show, desc="loglikelihood") as bar:
            for chunk in ordered.get_batched(n=self.batch_size):
                rows, spans = [], []
                for _, context, continuation in chunk:
                    if not context or not continuation or len(continuation) > self.max_length:
                        raise InputError("lm-eval gave a request with an empty context or "
                                         "continuation, or a continuation longer than "
                                         f"--max-length {self.max_length}")
                    row = (context + continuation)[-(self.max_length + 1):][:-1]
                    rows.append(row)
                    spans.append((len(row) - len(continuation), continuation))
                for (key, _, _), answer in zip(chunk, self._score(rows, spans), strict=True):
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(len(chunk))
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's full log-likelihood in disjoint windows of ``max_length`` (lm-eval's
        ``get_rolling_token_windows``, prefix BOS/EOS), as HFLM scores it."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(string),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(
                windows, disable_tqdm=disable_tqdm), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (each step one full forward pass, no KV cache: simple and the same at
        every TP x PP, slow for long answers) until a stop string or ``max_gen_toks``."""
        results = []
        show = self.progress and not disable_tqdm and dist.get_rank() == 0
        for req in tqdm(requests, disable=not show, desc="generate_until"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) not in (0, 0.0, None):
                raise InputError("eval-tasks decodes greedily only: this task asks for sampling "
                                 f"({kwargs}); choose a loglikelihood task")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            if eos not in until:
                until.append(eos)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            tokens = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            generated: list[int] = []
            text = ""
            for _ in range(max_gen):
                row = (tokens + generated)[-self.max_length:]
                nxt = self._next_token(row)
                generated.append(nxt)
                text = self.tok_decode(generated)
                if nxt == self.eot_token_id or any(s in text for s in until if s):
                    break
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _next_token(self, row: list[int]) -> int:
        """The greedy next token after ``row`` (same on every rank)."""
        multiple = self._pad_multiple()
        length = -(-len(row) // multiple) * multiple
        batch = torch.zeros((1, length), dtype=torch.long, device=self._device)
        batch[0, :len(row)] = torch.tensor(row, dtype=torch.long, device=self._device)
        out = torch.zeros(1, dtype=torch.long, device=self._device)

        def on_logits(logits):
            out[0] = vocab_parallel_argmax(mask_padded_vocab(logits, self.true_vocab_size))[
                0, len(row) - 1]

        forward_logits(self.model, batch, on_logits)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(out, group=ps.get_pipeline_model_parallel_group())
        return int(out.item())


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The global vocabulary index of the largest logit ([..., vocab / TP] slices on the TP
    ranks -> [...]); ties go to the lowest index, as ``torch.argmax`` on the full row."""
    values, index = logits.max(dim=-1)
    index = index + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    group = ps.get_tensor_model_parallel_group()
    all_values = [torch.empty_like(values) for _ in range(tp)]
    all_index = [torch.empty_like(index) for _ in range(tp)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_index, index.contiguous(), group=group)
    best = torch.stack(all_values).argmax(dim=0, keepdim=True)  # the first (lowest) rank wins
    return torch.stack(all_index).gather(0, best).squeeze(0)
