"""The model description every command reads: TransformerConfig fields plus what GPTModel needs.

``model_config.json`` = ``{"transformer": {TransformerConfig fields}, "vocab_size": ...,
"max_sequence_length": ..., "position_embedding_type": ..., "share_embeddings_and_output_weights":
..., "rotary_base": ..., "tokenizer": ...}``. Conversion writes it beside a checkpoint, so no
command repeats architecture flags. Activations are stored by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

FILENAME = "model_config.json"


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu, "relu": F.relu,
               "squared_relu": squared_relu}


MODEL_FILES = (FILENAME, "hf_config.json", "tokenizer")


def copy_model_files(source: str | Path, target: str | Path) -> None:
    """Copy model_config.json, the HF config and a shipped tokenizer directory (what
    conversion wrote) from ``source`` to ``target``, so every checkpoint a command writes can
    be read, converted back and exported on its own."""
    import shutil

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, target / name)


@dataclass
class ModelConfig:
    transformer: dict = field(default_factory=dict)
    vocab_size: int = 0
    max_sequence_length: int = 2048
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = True
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    tokenizer: str | None = None
    true_vocab_size: int | None = None  # rows above it are padding (vocab_size is padded)

    def __post_init__(self) -> None:
        activation = self.transformer.get("activation", "gelu")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from "
                             f"{', '.join(ACTIVATIONS)}")
        for needed in ("num_layers", "hidden_size", "num_attention_heads"):
            if needed not in self.transformer:
                raise ValueError(f"model config lacks transformer.{needed}")
        if self.vocab_size <= 0:
            raise ValueError("model config lacks a positive vocab_size")

    def transformer_config(self, tp: int = 1, pp: int = 1, *, device=None,
                           params_dtype: torch.dtype | None = None,
                           sequence_parallel: bool = False, **overrides):
        """A megatron ``TransformerConfig`` for this model at a parallel layout on ``device``.

        On a GPU the weights are created there by megatron's own initialisation; on the CPU
        (``device`` None or CPU) from one TP-independent master copy. ``params_dtype`` is the
        run's dtype for the frozen weights (default: the one the model config records)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        on_cpu = device is None or torch.device(device).type == "cpu"
        fields = dict(self.transformer)
        fields["activation_func"] = ACTIVATIONS[fields.pop("activation", "gelu")]
        recorded = getattr(torch, fields.pop("params_dtype", "float32"))
        dtype = params_dtype or recorded
        fields.setdefault("hidden_dropout", 0.0)
        fields.setdefault("attention_dropout", 0.0)
        fields.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      params_dtype=dtype, pipeline_dtype=dtype,
                      bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                      use_cpu_initialization=on_cpu, sequence_parallel=sequence_parallel,
                      batch_p2p_comm=not on_cpu)  # CPU: no CUDA sync in p2p
        fields.update(overrides)
        return TransformerConfig(**fields)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found")
        data = json.loads(path.read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown model config keys {sorted(unknown)}")
        tokenizer = data.get("tokenizer")
        if tokenizer and not Path(tokenizer).is_absolute() \
                and (path.parent / tokenizer).exists():  # shipped beside the config
            data["tokenizer"] = str(path.parent / tokenizer)
        return cls(**data)
