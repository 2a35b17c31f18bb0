"""Text or JSONL -> megatron-core indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

A ``.jsonl`` file gives one document per line (``{"text": ...}``); any other file is one
document. Each document is tokenised and followed by the end-of-document token. Files are
written under temporary names and renamed into place, so an interrupted run leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from maskllm_megatron.data.tokenizer import load_tokenizer
from maskllm_megatron.errors import InputError


def _documents(paths: list[Path], json_key: str):
    for path in paths:
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise InputError(f"{path}:{number}: expected a JSON object with a "
                                         f"{json_key!r} string ({err}); fix the line or give "
                                         "--json-key") from None
                    yield len(line.encode()), text
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            yield len(text.encode()), text


def preprocess(inputs: list[str | Path], tokenizer_path: str | Path, output_prefix: str | Path,
               json_key: str = "text", progress: bool = True) -> dict:
    """Tokenise ``inputs`` into ``output_prefix.{bin,idx}``; returns document/token counts."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input files not found: {missing}")
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    prefix = Path(output_prefix)
    made = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = f"{prefix}.bin.tmp{os.getpid()}", f"{prefix}.idx.tmp{os.getpid()}"
    documents = tokens = 0
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        total_bytes = sum(p.stat().st_size for p in paths)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                  disable=not progress) as bar:
            for size, text in _documents(paths, json_key):
                ids = list(tokenizer.tokenize(text)) + [tokenizer.eod]
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                documents += 1
                tokens += len(ids)
                bar.update(size)
        builder.finalize(tmp_idx)
    except BaseException:  # nothing half-written: no temporary files, no directory made
        for tmp in (tmp_bin, tmp_idx):
            Path(tmp).unlink(missing_ok=True)
        for directory in made:  # nearest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")
    return {"documents": documents, "tokens": tokens, "prefix": str(prefix)}
