"""Tokenizers through megatron-core's tokenizer library: SentencePiece models or HF directories.

Both are local files only (no hub). ``train_tokenizer`` trains a SentencePiece model whose
end-of-document id is the model's ``</s>``; megatron datasets use it as ``eod``.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizer

from maskllm_megatron.errors import InputError


def load_tokenizer(path: str | Path | None):
    """A megatron-core tokenizer for a ``.model`` SentencePiece file or an HF tokenizer dir."""
    if path is None:
        raise InputError("no tokenizer: the model config names none; give --tokenizer")
    path = Path(path)
    if path.is_dir():
        if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                         "vocab.json", "tokenizer.model")):
            raise InputError(f"{path} is not a Hugging Face tokenizer directory "
                             "(no tokenizer.json, tokenizer_config.json or vocab.json)")
        library = "huggingface"
    elif path.suffix == ".model" and path.is_file():
        library = "sentencepiece"
    else:
        raise InputError(f"tokenizer {path} not found or not supported: give a SentencePiece "
                         "'.model' file or a Hugging Face tokenizer directory")
    tokenizer = MegatronTokenizer.from_pretrained(str(path), metadata_path={"library": library})
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise InputError(f"tokenizer {path} has no end-of-document token (eos)")
    return tokenizer


def train_tokenizer(inputs: list[str | Path], model_prefix: str | Path, vocab_size: int = 4096,
                    model_type: str = "bpe") -> Path:
    """Train a SentencePiece model on text files; returns the ``.model`` path."""
    files = [str(p) for p in inputs]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"training text not found: {missing}")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=files, model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=True, unk_id=0, eos_id=1,
        bos_id=-1, pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        minloglevel=2)
    return Path(f"{model_prefix}.model")
