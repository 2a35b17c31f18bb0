"""The trainer's settings: megatron's flag names, one dataclass, checked before anything starts."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from maskllm_megatron import distributed
from maskllm_megatron.model.spec import TRANSFORMER_IMPLS
from maskllm_megatron.training.optim import state_format


@dataclass
class TrainArgs:
    """Megatron-style flags (``--tensor-model-parallel-size`` ...); a YAML file may set any."""

    model_config: str | None = None
    data_path: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: str | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int | None = None
    train_iters: int = 100
    lr: float = 5e-4  # the original: 5e-5 with a 10x multiplier on the mask logits
    min_lr: float = 5e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    main_grads_dtype: str = "bf16"  # DDP gradient buffers of the logits (fp32: exact sums)
    exp_avg_dtype: str = "bf16"  # Adam first moment, sharded over data parallel
    exp_avg_sq_dtype: str = "bf16"  # Adam second moment, sharded over data parallel
    clip_grad: float = 1.0
    device: str = "auto"  # cuda:LOCAL_RANK when CUDA is present, else cpu
    bf16: bool = False  # frozen weights' dtype; default bf16 on a GPU, fp32 on the CPU
    fp16: bool = False
    fp32: bool = False
    loss_scale: float | None = None  # fp16: a constant loss scale (default: dynamic)
    initial_loss_scale: float = 2.0**16
    transformer_impl: str | None = None  # local | transformer_engine (default: TE on a GPU)
    sequence_parallel: bool = False
    overlap_grad_reduce: bool | None = None  # default: on with NCCL, off on the CPU (gloo)
    N: int = 2
    M: int = 4
    gumbel_temperature_range: list[float] = field(default_factory=lambda: [4.0, 0.05])
    gumbel_scale_range: list[float] = field(default_factory=lambda: [1e2, 5e2])
    gumbel_schedule: str = "linear"
    hard_sampling: bool = False
    prior_strength: float = 3.0
    prior: str | None = None
    weight_reg: float = 1e-5
    train_weights: bool = False
    dense: bool = False  # masks off (dense pretraining with --train-weights)
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    exit_interval: int | None = None  # save and stop after this many iterations (SLURM limits)
    keep_checkpoints: int = 2
    eval_interval: int | None = None
    eval_iters: int = 10
    log_interval: int = 1
    seed: int = 1234
    skip_nonfinite_steps: int = 0
    tensorboard_dir: str | None = None
    progress: bool = True

    def optimizer_format(self) -> dict:
        """What a checkpoint records of the optimizer state (a resume must ask for the same)."""
        fmt = state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype)
        return {**fmt.describe(), "train_weights": self.train_weights}

    def validate(self) -> None:
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError("--lr-decay-style must be cosine, linear or constant")
        if self.dense and not self.train_weights:
            raise ValueError("--dense (masks off) only makes sense with --train-weights")
        state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype)
        if self.device not in distributed.DEVICES:
            raise ValueError(f"--device must be one of {', '.join(distributed.DEVICES)}")
        if sum((self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("give at most one of --bf16, --fp16, --fp32")
        if self.transformer_impl not in (None, *TRANSFORMER_IMPLS):
            raise ValueError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}")
        if self.lr_warmup_iters >= self.train_iters:
            raise ValueError("--lr-warmup-iters must be below --train-iters")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.train_iters < 1:
            raise ValueError("--train-iters must be positive")
        for name in ("gumbel_temperature_range", "gumbel_scale_range"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"--{name.replace('_', '-')} takes two numbers: start end")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the flags below (same names)")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool) or f.type == "bool | None":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            kind = float if f.name.startswith("gumbel") else str
            parser.add_argument(flag, nargs="+", type=kind, default=None)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            kind = {"int | None": int, "float | None": float}.get(f.type, kind)
            parser.add_argument(flag, type=kind, default=None)


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    values: dict = {}
    if getattr(ns, "config", None):
        import yaml

        loaded = yaml.safe_load(Path(ns.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(TrainArgs)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"{ns.config}: unknown setting {key!r}")
            if isinstance(value, str) and value.startswith("~"):
                value = os.path.expanduser(value)
            elif isinstance(value, list):
                value = [os.path.expanduser(v) if isinstance(v, str) else v for v in value]
            values[name] = value
    for f in dataclasses.fields(TrainArgs):
        value = getattr(ns, f.name, None)
        if value is not None:
            values[f.name] = value
    args = TrainArgs(**values)
    args.validate()
    return args
