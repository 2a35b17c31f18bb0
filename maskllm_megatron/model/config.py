"""The model description every command reads: the transformer's shape plus what GPTModel needs.

``model_config.json`` = ``{"version": 2, "transformer": {TransformerFields}, "vocab_size": ...,
"max_sequence_length": ..., "position_embedding_type": ..., "share_embeddings_and_output_weights":
..., "rotary_base": ..., "rotary_percent": ..., "tokenizer": ..., "true_vocab_size": ...}``.
Conversion writes it beside a checkpoint, so no command repeats architecture flags.

The file keeps the nested layout that earlier versions wrote (``transformer`` holds the megatron
``TransformerConfig`` fields, activation and dtype by name), so every checkpoint directory
written before stays readable: a file without ``version`` is version 1, whose ``transformer``
may leave out fields (megatron's defaults fill them). Loading checks every field's type and
value and names the field at fault, so a bad file fails here rather than deep in megatron.
Optional sizes (query groups, FFN size, head size) are resolved on load to megatron's own
defaults, so the rest of the code reads plain integers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.paths import write_file_atomically

FILENAME = "model_config.json"
VERSION = 2  # 1: no "version" key, optional sizes may be absent


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu, "relu": F.relu,
               "squared_relu": squared_relu}
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")


MODEL_FILES = (FILENAME, "hf_config.json", "tokenizer")


class ModelConfigError(InputError):
    """A model config field has the wrong type or an impossible value."""


def copy_model_files(source: str | Path, target: str | Path) -> None:
    """Copy model_config.json, the HF config and a shipped tokenizer directory (what
    conversion wrote) from ``source`` to ``target``, so every checkpoint a command writes can
    be read, converted back and exported on its own."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, target / name)


def _check_type(name: str, value, kind: type | tuple[type, ...]) -> None:
    """``kind`` checked strictly: a JSON ``true`` is no integer, a string no number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ModelConfigError(f"model config: {name} must be {names}, got {value!r}")


def _check_positive(name: str, value) -> None:
    _check_type(name, value, int)
    if value <= 0:
        raise ModelConfigError(f"model config: {name} must be positive, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ModelConfigError(f"model config: {name} {value!r} is unknown; choose from "
                               f"{', '.join(choices)}")


@dataclass
class TransformerFields:
    """The megatron ``TransformerConfig`` fields a model is defined by (activation and dtype by
    name, so the file stays JSON). ``None`` sizes take megatron's defaults on construction."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None  # None: one per head (no GQA)
    ffn_hidden_size: int | None = None  # None: 4 x hidden
    kv_channels: int | None = None  # head size; None: hidden // heads
    activation: str = "gelu"
    gated_linear_unit: bool = False
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False  # per-head RMSNorm/LayerNorm of queries and keys (Qwen3)
    # sliding-window attention as megatron takes it: [tokens to the left, to the right] of the
    # query, so Mistral's ``sliding_window`` W is [W - 1, 0]; None: full causal attention.
    # Written only when set, so files of models without a window stay readable by older code.
    window_size: list[int] | None = None
    params_dtype: str = "float32"  # the dtype the weights were written in
    # std of the normal initialisation of a freshly built model (megatron's init_method_std;
    # HF's initializer_range); only a model trained from scratch uses it
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            _check_positive(f"transformer.{name}", getattr(self, name))
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for name in ("num_query_groups", "ffn_hidden_size", "kv_channels"):
            _check_positive(f"transformer.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(
                f"model config: transformer.num_query_groups {self.num_query_groups} must "
                f"divide transformer.num_attention_heads {self.num_attention_heads}")
        _check_choice("transformer.activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("transformer.normalization", self.normalization, NORMALIZATIONS)
        _check_choice("transformer.params_dtype", self.params_dtype, PARAMS_DTYPES)
        for name in ("layernorm_epsilon", "init_method_std"):
            value = getattr(self, name)
            _check_type(f"transformer.{name}", value, (float, int))
            if not value > 0:
                raise ModelConfigError(f"model config: transformer.{name} must be positive, "
                                       f"got {value}")
        for name in ("gated_linear_unit", "layernorm_zero_centered_gamma", "add_bias_linear",
                     "add_qkv_bias", "qk_layernorm"):
            _check_type(f"transformer.{name}", getattr(self, name), bool)
        if self.window_size is not None:
            window = self.window_size
            if not (isinstance(window, (list, tuple)) and len(window) == 2
                    and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                            for w in window)):
                raise ModelConfigError("model config: transformer.window_size must be two "
                                       f"non-negative integers [left, right], got {window!r}")
            self.window_size = list(window)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerFields:
        _check_type("transformer", data, dict)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelConfigError(f"model config: unknown transformer fields {sorted(unknown)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ModelConfigError(f"model config lacks transformer.{missing[0]}")
        return cls(**data)


@dataclass
class ModelConfig:
    """A model as every command reads it: the transformer, then what ``GPTModel`` takes."""

    transformer: TransformerFields
    vocab_size: int
    max_sequence_length: int = 2048
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = True
    rotary_base: float = 10000
    rotary_percent: float = 1.0
    tokenizer: str | None = None
    true_vocab_size: int | None = None  # rows above it are padding (vocab_size is padded)
    version: int = VERSION  # of the layout this config was read from

    def __post_init__(self) -> None:
        _check_type("transformer", self.transformer, TransformerFields)
        _check_positive("vocab_size", self.vocab_size)
        _check_positive("max_sequence_length", self.max_sequence_length)
        _check_choice("position_embedding_type", self.position_embedding_type,
                      POSITION_EMBEDDINGS)
        _check_type("share_embeddings_and_output_weights",
                    self.share_embeddings_and_output_weights, bool)
        _check_type("rotary_base", self.rotary_base, (float, int))
        _check_type("rotary_percent", self.rotary_percent, (float, int))
        if not 0 < self.rotary_percent <= 1:
            raise ModelConfigError("model config: rotary_percent must lie in (0, 1], got "
                                   f"{self.rotary_percent}")
        if self.tokenizer is not None:
            _check_type("tokenizer", self.tokenizer, str)
        if self.true_vocab_size is not None:
            _check_positive("true_vocab_size", self.true_vocab_size)
            if self.true_vocab_size > self.vocab_size:
                raise ModelConfigError(
                    f"model config: true_vocab_size {self.true_vocab_size} exceeds the padded "
                    f"vocab_size {self.vocab_size}")
        _check_type("version", self.version, int)
        if not 1 <= self.version <= VERSION:
            raise ModelConfigError(f"model config: version {self.version} is not one this "
                                   f"code reads (1 to {VERSION}); update maskllm_megatron")

    def transformer_config(self, tp: int = 1, pp: int = 1, *, device=None,
                           params_dtype: torch.dtype | None = None,
                           sequence_parallel: bool = False, **overrides):
        """A megatron ``TransformerConfig`` for this model at a parallel layout on ``device``.

        On a GPU the weights are created there by megatron's own initialisation; on the CPU
        (``device`` None or CPU) from one TP-independent master copy. ``params_dtype`` is the
        run's dtype for the frozen weights (default: the one the model config records)."""
        on_cpu = device is None or torch.device(device).type == "cpu"
        shape = asdict(self.transformer)
        shape["activation_func"] = ACTIVATIONS[shape.pop("activation")]
        if shape["window_size"] is not None:
            shape["window_size"] = tuple(shape["window_size"])  # megatron's type
        dtype = params_dtype or getattr(torch, shape.pop("params_dtype"))
        shape.update(hidden_dropout=0.0, attention_dropout=0.0,
                     tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     params_dtype=dtype, pipeline_dtype=dtype,
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     use_cpu_initialization=on_cpu, sequence_parallel=sequence_parallel,
                     batch_p2p_comm=not on_cpu)  # CPU: no CUDA sync in p2p
        shape.update(overrides)
        if shape.get("window_size"):  # megatron's fused softmax kernel ignores the window
            shape["masked_softmax_fusion"] = False
        return TransformerConfig(**shape)

    def to_dict(self) -> dict:
        """The current file layout: ``version`` first, then the fields in dataclass order."""
        data = asdict(self)
        del data["version"]
        if data["transformer"]["window_size"] is None:
            del data["transformer"]["window_size"]
        return {"version": VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Version 1 (no ``version`` key) and version 2 layouts alike."""
        _check_type("the top level", data, dict)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelConfigError(f"model config: unknown keys {sorted(unknown)}")
        if "transformer" not in data or "vocab_size" not in data:
            raise ModelConfigError("model config lacks "
                                   + ("transformer" if "transformer" not in data
                                      else "a positive vocab_size"))
        return cls(**{**data, "transformer": TransformerFields.from_dict(data["transformer"]),
                      "version": data.get("version", 1)})

    def save(self, directory: str | Path) -> Path:
        return write_file_atomically(Path(directory) / FILENAME,
                                     json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:  # JSON and Unicode errors
            raise CheckpointError(f"{path}: not valid JSON ({error}); the file is truncated or "
                                  "corrupted, write it again") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not a model "
                                  "config object")
        try:
            cfg = cls.from_dict(data)
        except ModelConfigError as error:
            raise ModelConfigError(f"{path}: {error}") from None
        tokenizer = cfg.tokenizer
        if tokenizer and not Path(tokenizer).is_absolute() \
                and (path.parent / tokenizer).exists():  # shipped beside the config
            cfg.tokenizer = str(path.parent / tokenizer)
        return cfg
