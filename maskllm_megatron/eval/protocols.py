"""Perplexity protocols by name (``maskllm eval-ppl --protocol``): how a test corpus becomes the
token windows that are scored.

A published perplexity depends on more than the model: how the corpus's documents are joined,
whether a BOS starts the stream, the window length, how many windows count and whether the last,
partial window does. Each protocol pins all of these, so a number is comparable with the papers
it names. ``demo`` is the project's own protocol (the file tokenised as it is, the tail window
kept); the others follow the SparseGPT / Wanda / MaskLLM evaluation code:

* WikiText-2: ``tokenizer("\\n\\n".join(test["text"]))``, non-overlapping windows of ``seqlen``,
  ``nsamples = numel // seqlen`` (the partial last window is dropped);
* C4: ``tokenizer(" ".join(valdata[:1100]["text"]))``, cut to its first 256 windows.

A Hugging Face LLaMA tokenizer adds one BOS at the very start of that single call; ``bos`` does
the same with the checkpoint's tokenizer (nothing when the tokenizer has no BOS, as GPT-2's).

Nothing is downloaded; the corpus is a local file (:func:`protocol_text` says which forms).
Importing this module is light: the CLI lists the names in its help.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from maskllm_megatron.errors import InputError


@dataclass(frozen=True)
class Protocol:
    """One named way of turning a corpus into scored windows."""

    name: str
    join: str | None  # the records joined with this; None: the file is the text, as it is
    bos: bool  # one BOS before the whole stream (when the tokenizer has one)
    seq_length: int | None  # window length; None: the model's max_sequence_length
    max_windows: int | None  # only the first windows count (C4: 256)
    last_window: Literal["keep", "drop"]  # the last, partial window
    max_records: int | None = None  # only the first records of a JSONL corpus (C4: 1100)
    lines_are_records: bool = False  # a plain-text corpus: one record per line (wiki.test.raw)
    reproduces: str = ""  # what its numbers compare with


PROTOCOLS = {p.name: p for p in (
    Protocol("demo", join=None, bos=False, seq_length=None, max_windows=None,
             last_window="keep",
             reproduces="this project's own numbers (the demo, the benches)"),
    Protocol("wikitext2-2048", join="\n\n", bos=True, seq_length=2048, max_windows=None,
             last_window="drop", lines_are_records=True,
             reproduces="WikiText-2 at 2048 tokens, the SparseGPT evaluation code's setting "
                        "(LLaMA-2 7B dense: 5.47, e.g. AWQ's FP16 row)"),
    Protocol("wikitext2-4096", join="\n\n", bos=True, seq_length=4096, max_windows=None,
             last_window="drop", lines_are_records=True,
             reproduces="MaskLLM's WikiText-2 perplexities (LLaMA-2 7B dense: 5.12)"),
    Protocol("c4-2048", join=" ", bos=True, seq_length=2048, max_windows=256,
             last_window="drop", max_records=1100,
             reproduces="SparseGPT's C4 perplexities (first validation shard, 256 windows)"),
)}
DEFAULT_PROTOCOL = "demo"


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (``None``: the default), or a user error listing them."""
    name = DEFAULT_PROTOCOL if name is None else name
    if name not in PROTOCOLS:
        raise InputError(f"unknown --protocol {name!r}; give one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def _jsonl_records(lines, path: Path, limit: int | None) -> list[str]:
    """The ``"text"`` fields, read no further than ``limit`` records (C4's shards are large)."""
    records = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number} is not JSON ({err.msg}); a .jsonl/.json "
                             "corpus holds one JSON object with a \"text\" field per line") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}: line {number} has no string \"text\" field")
        records.append(record["text"])
    return records


def protocol_text(path: str | Path, protocol: Protocol) -> str:
    """The text ``protocol`` tokenises, read from a local corpus file.

    * ``demo``: the file as it is (UTF-8).
    * A ``.jsonl`` / ``.json`` file (optionally ``.gz``, as C4's shards come): one JSON object
      per line, its ``"text"`` field a record (the records of a ``datasets`` split written with
      ``to_json``); the first ``max_records`` are joined with ``join``.
    * Otherwise plain text. WikiText-2: the raw test file (``wiki.test.raw`` of
      wikitext-2-raw-v1), one record per line, read as Hugging Face's ``wikitext`` loader does
      (each line keeps its newline; a blank line is the empty record), then joined with
      ``"\\n\\n"``: exactly ``"\\n\\n".join(test["text"])``. C4: the already joined text.
    """
    path = Path(path)
    if protocol.join is None:
        return path.read_text(encoding="utf-8")
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if _is_jsonl(path):
            records = _jsonl_records(f, path, protocol.max_records)
        elif protocol.lines_are_records:
            records = [line if line.strip() else "" for line in f]
        else:
            return f.read()
    return protocol.join.join(records[:protocol.max_records])


def protocol_tokens(text: str, tokenizer, protocol: Protocol) -> tuple[list[int], bool]:
    """The token stream of ``text``, and whether a BOS was put before it."""
    ids = list(tokenizer.tokenize(text))
    bos = getattr(tokenizer, "bos", None) if protocol.bos else None
    if bos is not None and bos >= 0:
        return [bos, *ids], True
    return ids, False


def protocol_cut(n_tokens: int, seq_length: int, protocol: Protocol) -> int:
    """How many tokens of the stream are scored: whole windows only under ``last_window =
    "drop"`` (``nsamples = numel // seqlen``), at most ``max_windows`` of them."""
    keep = n_tokens
    if protocol.last_window == "drop":
        keep = n_tokens // seq_length * seq_length
        if keep == 0:
            raise InputError(f"the text has {n_tokens} tokens, less than one window of "
                             f"{seq_length}; protocol {protocol.name} drops a partial window: "
                             "give a longer --text or a smaller --seq-length")
    if protocol.max_windows is not None:
        keep = min(keep, protocol.max_windows * seq_length)
    return keep


def describe(protocol: Protocol, seq_length: int, bos: bool) -> str:
    """One line saying what ran (the CLI prints it above the table)."""
    if protocol.join is None:
        source = "the file tokenised as it is"
    else:
        source = f"records joined with {protocol.join!r}"
        if protocol.max_records is not None:
            source += f" (first {protocol.max_records} of a JSONL corpus)"
    windows = f"windows of {seq_length} tokens"
    if protocol.seq_length is not None and seq_length != protocol.seq_length:
        windows += f" (--seq-length; the protocol's is {protocol.seq_length})"
    if protocol.max_windows is not None:
        windows += f", the first {protocol.max_windows}"
    last = "last partial window " + ("kept" if protocol.last_window == "keep" else "dropped")
    return (f"protocol {protocol.name}: {source}, {'a BOS first' if bos else 'no BOS'}, "
            f"{windows}, {last}")
