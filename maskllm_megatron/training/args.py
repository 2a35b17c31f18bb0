"""The trainer's settings: megatron's flag names, one dataclass, checked before anything starts.

Only the standard library is imported here: the CLI builds its ``--help`` from these fields
without loading megatron (whose import warns when Transformer Engine or Apex are missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskllm_megatron.errors import InputError


def _flag(default, help: str, **kwargs):  # noqa: A002 - argparse's own word
    """A field whose ``help`` becomes the ``maskllm train`` flag's help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainArgs:
    """Megatron-style flags (``--tensor-model-parallel-size`` ...); a YAML file may set any."""

    model_config: str | None = _flag(
        None, "model_config.json or its directory (default: the one beside --load)")
    data_path: list[str] = _flag(
        [], "indexed dataset prefixes (PREFIX.bin/.idx), optionally weighted as megatron's "
        "blends: W1 PREFIX1 W2 PREFIX2")
    split: str = _flag("98,2,0", "train,valid,test weights of each dataset, as in megatron")
    tokenizer: str | None = _flag(
        None, "SentencePiece .model or Hugging Face tokenizer directory (default: the model "
        "config's tokenizer)")
    tensor_model_parallel_size: int = _flag(1, "tensor-parallel ranks (GPUs) per model copy")
    pipeline_model_parallel_size: int = _flag(1, "pipeline stages per model copy; divides the "
                                              "layer count")
    micro_batch_size: int = _flag(1, "sequences per forward/backward pass on one rank")
    global_batch_size: int = _flag(8, "sequences per optimizer step over all data-parallel "
                                   "ranks and micro-batches")
    seq_length: int | None = _flag(None, "tokens per sequence (default: the model's max "
                                   "sequence length)")
    train_iters: int = _flag(100, "optimizer steps (iterations) of the whole run")
    lr: float = _flag(5e-4, "peak learning rate of the mask logits (the paper: 5e-5 with a "
                      "10x multiplier on the logits, i.e. 5e-4)")
    min_lr: float = _flag(5e-5, "learning rate at the end of the decay")
    lr_warmup_iters: int = _flag(0, "iterations of linear warm-up from 0 to --lr")
    lr_decay_style: str = _flag("cosine", "cosine | linear | constant, from --lr to --min-lr "
                                "over the iterations after warm-up")
    weight_decay: float = _flag(0.0, "AdamW decoupled weight decay (per step, times lr)")
    adam_beta1: float = _flag(0.9, "Adam first-moment decay")
    adam_beta2: float = _flag(0.95, "Adam second-moment decay")
    adam_eps: float = _flag(1e-8, "Adam denominator epsilon")
    main_grads_dtype: str = _flag(
        "bf16", "dtype of the DDP gradient buffers of the mask logits: bf16 (2 bytes per "
        "logit) | fp32 (4 bytes, exact sums)")
    exp_avg_dtype: str = _flag("bf16", "Adam first moment, sharded over data parallel: bf16 | "
                               "fp16 | fp32")
    exp_avg_sq_dtype: str = _flag("bf16", "Adam second moment, sharded over data parallel: "
                                  "bf16 | fp16 | fp32")
    clip_grad: float = _flag(1.0, "global gradient-norm clipping threshold (L2 norm)")
    device: str = _flag("auto", "auto | cuda | cpu; auto: cuda:LOCAL_RANK when CUDA is "
                        "present, else the CPU")
    bf16: bool = _flag(False, "frozen weights in bf16 (default when none of --bf16/--fp16/"
                       "--fp32 is given: bf16 on a GPU, fp32 on the CPU)")
    fp16: bool = _flag(False, "frozen weights in fp16, with loss scaling")
    fp32: bool = _flag(False, "frozen weights in fp32")
    loss_scale: float | None = _flag(None, "fp16: a constant loss scale (default: dynamic "
                                     "loss scaling)")
    initial_loss_scale: float = _flag(2.0**16, "fp16: the dynamic loss scale's start value")
    transformer_impl: str | None = _flag(
        None, "local | transformer_engine: norms and attention around the sparse linears "
        "(default: Transformer Engine on a GPU where it imports, else local)")
    sequence_parallel: bool = _flag(False, "split activations along the sequence over TP "
                                    "ranks (needs --tensor-model-parallel-size > 1)")
    overlap_grad_reduce: bool | None = _flag(
        None, "overlap the data-parallel gradient reduce-scatter with backward (default: on "
        "with NCCL, off on the CPU with gloo)")
    N: int = _flag(2, "N of the N:M pattern: weights kept per group")
    M: int = _flag(4, "M of the N:M pattern: group size along the input dimension")
    gumbel_temperature_range: list[float] = _flag(
        [4.0, 0.05], "Gumbel-softmax temperature tau, start end (annealed; the paper: 4 -> 0.05)")
    gumbel_scale_range: list[float] = _flag(
        [1e2, 5e2], "logit scale kappa, start end (the paper: 1e2 -> 5e2)")
    gumbel_schedule: str = _flag("linear", "how tau and kappa move from start to end over "
                                 "--train-iters: linear | cosine")
    hard_sampling: bool = _flag(False, "straight-through hard masks in the forward pass "
                                "(gradients through the soft ones)")
    prior_strength: float = _flag(3.0, "logit bias towards the --prior mask (the paper: 3)")
    prior: str | None = _flag(None, "checkpoint whose masks (e.g. SparseGPT's, from maskllm "
                              "prune, or published ones, from maskllm import-masks: SAVE/masks) "
                              "initialise the logits (default: none, uniform logits)")
    weight_reg: float = _flag(1e-5, "weight lambda of the sparse-weight regulariser, "
                              "subtracted from the LM loss as in MaskLLM: loss = LM - lambda * "
                              "(1 - t/T) * sum((W * mask)^2), rewarding masks that keep large "
                              "weights; decayed linearly to 0 over the run; >= 0 (0: off)")
    kd_weight: float = _flag(
        0.0, "distillation weight a in [0, 1]: loss = (1 - a) * CE + a * T^2 * KL(teacher || "
        "student), the teacher being the same model with its masks off, run in the same "
        "forward pass on a doubled micro-batch (no second copy of the weights; about twice the "
        "activations) (default: 0, off)")
    kd_temperature: float = _flag(
        1.0, "distillation temperature T > 0: both softmaxes at logits / T, the KL scaled by "
        "T^2 (Hinton's convention) so that its gradient keeps the cross-entropy's scale")
    train_weights: bool = _flag(False, "train the weights too (default: frozen, only masks "
                                "learn)")
    dense: bool = _flag(False, "masks off: dense pretraining (needs --train-weights)")
    load: str | None = _flag(None, "checkpoint to start from: a run, iter_N or model directory "
                             "(default: none, random weights)")
    save: str | None = _flag(None, "run directory for checkpoints and logs; a rerun resumes "
                             "from its latest (default: none, nothing saved)")
    save_interval: int | None = _flag(None, "iterations between checkpoints (default: only at "
                                      "the end)")
    exit_interval: int | None = _flag(None, "save and stop after this many iterations, for "
                                      "SLURM time limits (default: never)")
    keep_checkpoints: int = _flag(2, "checkpoints kept in --save (older ones deleted)")
    eval_interval: int | None = _flag(None, "iterations between validation losses (default: "
                                      "none)")
    eval_iters: int = _flag(10, "validation batches (iterations) per evaluation")
    log_interval: int = _flag(1, "iterations between log lines")
    seed: int = _flag(1234, "seed of data order and mask noise")
    skip_nonfinite_steps: int = _flag(0, "steps with a non-finite loss or gradient norm to skip "
                                      "before the run stops")
    tensorboard_dir: str | None = _flag(None, "TensorBoard event files (default: none)")
    progress: bool = _flag(True, "progress bar on rank 0")
    progress_label: str | None = _flag(
        None, "what the progress bar says runs (default: dense pretraining with --dense, mask "
        "and weight learning with --train-weights, else mask learning)")

    def optimizer_format(self) -> dict:
        """What a checkpoint records of the optimizer state (a resume must ask for the same)."""
        from maskllm_megatron.training.optim import state_format

        fmt = state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype)
        return {**fmt.describe(), "train_weights": self.train_weights}

    def validate(self) -> None:
        # imported here so that building --help loads no megatron
        from maskllm_megatron import distributed
        from maskllm_megatron.core.nm import NMPattern
        from maskllm_megatron.model.spec import TRANSFORMER_IMPLS
        from maskllm_megatron.training.optim import state_format

        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise InputError("--lr-decay-style must be cosine, linear or constant")
        if self.dense and not self.train_weights:
            raise InputError("--dense (masks off) only makes sense with --train-weights")
        state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype)
        if self.device not in distributed.DEVICES:
            raise InputError(f"--device must be one of {', '.join(distributed.DEVICES)}")
        if sum((self.bf16, self.fp16, self.fp32)) > 1:
            raise InputError("give at most one of --bf16, --fp16, --fp32")
        if self.transformer_impl not in (None, *TRANSFORMER_IMPLS):
            raise InputError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}")
        if self.lr_warmup_iters >= self.train_iters:
            raise InputError("--lr-warmup-iters must be below --train-iters")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise InputError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.train_iters < 1:
            raise InputError("--train-iters must be positive")
        if not self.weight_reg >= 0:  # NaN too
            raise InputError(f"--weight-reg must be >= 0 (got {self.weight_reg}): it is the "
                             "regulariser's magnitude; the trainer subtracts the term as "
                             "MaskLLM does (0 turns it off)")
        for name in ("gumbel_temperature_range", "gumbel_scale_range"):
            if len(getattr(self, name)) != 2:
                raise InputError(f"--{name.replace('_', '-')} takes two numbers: start end")
        NMPattern(self.N, self.M)  # N < M, M in range
        if not 0.0 <= self.kd_weight <= 1.0:
            raise InputError(f"--kd-weight must be in [0, 1] (0: no distillation), got "
                             f"{self.kd_weight}")
        if not 0.0 < self.kd_temperature < float("inf"):
            raise InputError(f"--kd-temperature must be a positive number, got "
                             f"{self.kd_temperature}")
        if self.kd_weight > 0 and self.dense:
            raise InputError("--kd-weight distils the dense model into the masked one; with "
                             "--dense the masks are off: drop one of them")
