"""The mask-learning trainer: megatron-core pipeline schedules, AdamW on the logits, exact resume.

Story of one run (:func:`train`):

1. start distributed work and build the model from ``model_config.json`` with sparse layers;
2. load the newest checkpoint in ``--save`` (exact resume) or else ``--load`` (dense weights) and
   ``--prior`` (bias the logits towards a hard mask);
3. each iteration: set tau / kappa / lr from the iteration, run megatron's forward-backward over
   the micro-batches (each micro-batch draws its own sample; each data-parallel rank too), add
   the sparse-weight regulariser of *every* pipeline stage, average logits gradients over data
   parallel, clip by the norm over all ranks, refuse non-finite steps, AdamW;
4. log (progress bar, JSONL, TensorBoard), save atomically, and plot at the end.

Everything that varies per step (noise keys, data position, schedules) is a pure function of
the iteration, so a checkpoint holds only tensors (logits, optimizer moments) and the iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import runtime
from .checkpoint import load_model, save_model
from .layers import MaskSettings, SamplingState, attach_sampling, sparse_layers
from .model_config import ModelConfig
from .nm import NMPattern, apply_prior
from .optim import FULL, MaskAdamW, mask_state_format
from .schedules import GumbelSchedule


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss beyond the skip budget, bad checkpoint, ...)."""


# ----------------------------------------------------------------------------- arguments


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
    main_grads_dtype: str = "bf16"  # mask-logit gradient buffers (fp32: exact accumulation)
    exp_avg_dtype: str = "bf16"  # Adam first moment of the logits
    exp_avg_sq_dtype: str = "bf16"  # Adam second moment of the logits
    second_moment: str = "element"  # per logit, or per N:M group (13 B/weight, see optim.py)
    clip_grad: float = 1.0
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
    keep_checkpoints: int = 2
    eval_interval: int | None = None
    eval_iters: int = 10
    log_interval: int = 1
    seed: int = 1234
    skip_nonfinite_steps: int = 0
    tensorboard_dir: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError("--lr-decay-style must be cosine, linear or constant")
        if self.dense and not self.train_weights:
            raise ValueError("--dense (masks off) only makes sense with --train-weights")
        mask_state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype,
                          self.second_moment)
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
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            kind = float if f.name.startswith("gumbel") else str
            parser.add_argument(flag, nargs="+", type=kind, default=None)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.type in ("int | None",):
                kind = int
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


# ----------------------------------------------------------------------------- schedules


def learning_rate(args: TrainArgs, iteration: int) -> float:
    if args.lr_warmup_iters and iteration < args.lr_warmup_iters:
        return args.lr * (iteration + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return args.lr
    decay_iters = max(1, args.train_iters - args.lr_warmup_iters)
    progress = min(1.0, (iteration - args.lr_warmup_iters) / decay_iters)
    if args.lr_decay_style == "linear":
        return args.lr + (args.min_lr - args.lr) * progress
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class _AuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` into ``aux`` (megatron's
    MoE aux-loss idiom): adds a stage-local term to the loss on any pipeline stage."""

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


# ----------------------------------------------------------------------------- the run


def train(args: TrainArgs) -> dict:
    """Run (or resume) training; returns the final metrics."""
    layout = runtime.init_distributed(args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, args.seed)
    main_rank = layout.rank == 0
    model_cfg = _model_config(args)
    seq_length = args.seq_length or model_cfg.max_sequence_length
    pattern = NMPattern(args.N, args.M)
    model, state = _build_model(args, model_cfg, layout)
    optimizer = _optimizer(model, args)
    params = optimizer.params()
    start = _restore(args, model, optimizer, pattern)
    if main_rank:
        _print_memory_table(model, optimizer, args)

    from .data.datasets import BatchLayout, build_gpt_datasets
    from .data.tokenizer import load_tokenizer

    batches = BatchLayout(args.micro_batch_size, args.global_batch_size, layout.dp)
    tokenizer = load_tokenizer(args.tokenizer or model_cfg.tokenizer)
    eval_samples = args.global_batch_size * args.eval_iters * (
        args.train_iters // args.eval_interval + 1 if args.eval_interval else 0)
    train_ds, valid_ds, _ = build_gpt_datasets(
        args.data_path, tokenizer, seq_length, args.seed,
        (args.train_iters * args.global_batch_size, eval_samples, 0), split=args.split)
    schedule = GumbelSchedule(tuple(args.gumbel_temperature_range),
                              tuple(args.gumbel_scale_range), args.train_iters,
                              args.gumbel_schedule)
    if main_rank and args.save:  # the run directory describes its model on its own
        from .model_config import copy_model_files

        source = Path(args.model_config or args.load)
        copy_model_files(source if source.is_dir() else source.parent, args.save)
        model_cfg.save(args.save)
    logger = _Logger(args, main_rank, start)
    previous_argmax = _argmax_snapshot(model)
    skipped = 0
    metrics: dict = {}
    for iteration in range(start, args.train_iters):
        state.iteration, state.dp_rank = iteration, layout.dp_rank
        state.tau, state.kappa = schedule.tau(iteration), schedule.kappa(iteration)
        lr = learning_rate(args, iteration)
        reg_weight = args.weight_reg * (1.0 - iteration / args.train_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss, reg = _forward_backward(model, state, train_ds, batches, iteration, seq_length,
                                      reg_weight, args)
        _reduce_gradients(model, params)
        grad_norm = _clip_gradients(params, args.clip_grad)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            skipped += 1
            what = "loss" if not math.isfinite(loss) else "gradient"
            message = (f"iteration {iteration}: non-finite {what} (loss={loss}, "
                       f"grad norm={grad_norm}); step refused")
            if skipped > args.skip_nonfinite_steps:
                logger.close()
                raise TrainingError(message + f"; {skipped} such steps exceed "
                                    f"--skip-nonfinite-steps={args.skip_nonfinite_steps}")
            logger.note(message)
            continue
        optimizer.step()
        step = iteration + 1
        metrics = dict(iteration=step, loss=loss, reg=reg, lr=lr, tau=state.tau,
                       kappa=state.kappa, grad_norm=grad_norm, skipped=skipped)
        if args.log_interval and step % args.log_interval == 0:
            metrics.update(_mask_statistics(model, previous_argmax, state))
            previous_argmax = _argmax_snapshot(model)
        if args.eval_interval and valid_ds is not None and step % args.eval_interval == 0:
            metrics["val_loss"] = evaluate(model, state, valid_ds, batches, seq_length,
                                           args.eval_iters)
        logger.log(metrics)
        if args.save and (step == args.train_iters or
                          (args.save_interval and step % args.save_interval == 0)):
            save_checkpoint(model, optimizer, args, step)
    logger.close()
    return metrics


# ----------------------------------------------------------------------------- building


def _model_config(args: TrainArgs) -> ModelConfig:
    source = args.model_config or args.load
    if source is None:
        raise ValueError("give --model-config (or --load with a model_config.json)")
    return ModelConfig.load(source)


def _build_model(args: TrainArgs, cfg: ModelConfig, layout):
    from .spec import build_gpt_model

    config = cfg.transformer_config(layout.tp, layout.pp)
    torch.manual_seed(args.seed)
    settings = MaskSettings(pattern=NMPattern(args.N, args.M),
                            mode="dense" if args.dense else "learn",
                            hard_sampling=args.hard_sampling)
    model = build_gpt_model(
        config, cfg.vocab_size, cfg.max_sequence_length, settings,
        position_embedding_type=cfg.position_embedding_type,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        rotary_base=cfg.rotary_base, rotary_percent=cfg.rotary_percent)
    state = SamplingState(seed=args.seed, dp_rank=layout.dp_rank)
    attach_sampling(model, state)
    return model, state


def _optimizer(model, args: TrainArgs) -> MaskAdamW:
    """Mask logits only (compact state), unless --train-weights: nothing else gets gradients
    or Adam state. Weights, when trained, get plain fp32 AdamW state."""
    logits, others = [], []
    for name, param in model.named_parameters():
        is_logits = name.endswith("mask_logits")
        learn = (is_logits and not args.dense) or args.train_weights
        param.requires_grad_(learn)
        if learn:
            (logits if is_logits else others).append(param)
    if not logits and not others:
        raise TrainingError("nothing to train: the model has no sparse layers")
    fmt = mask_state_format(args.main_grads_dtype, args.exp_avg_dtype, args.exp_avg_sq_dtype,
                            args.second_moment)
    groups = [g for g in ({"params": logits, "format": fmt}, {"params": others, "format": FULL})
              if g["params"]]
    return MaskAdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                     eps=args.adam_eps, weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------- one step


def _forward_backward(model, state, dataset, batches, iteration, seq_length, reg_weight, args):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .data.datasets import batch_for
    from .layers import regularizer

    microbatch = iter(range(batches.num_microbatches))
    regs: list[float] = []

    def forward_step(data_iterator, model):
        k = next(microbatch)
        state.microbatch = k
        batch = batch_for(dataset, batches, iteration, k, state.dp_rank)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        reg = regularizer(model)
        if reg is not None:
            regs.append(float(reg.detach()))
            if reg_weight > 0:  # this stage's (and TP shard's) term, on every stage
                output = _AuxLoss.apply(output, reg, reg_weight / batches.num_microbatches)
        mask = batch["loss_mask"].float()

        def loss_func(output_tensor):
            loss = (output_tensor.float() * mask).sum() / mask.sum()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=None, model=[model],
        num_microbatches=batches.num_microbatches, seq_length=seq_length,
        micro_batch_size=batches.micro_batch_size, forward_only=False)
    loss = torch.tensor(
        [float(torch.stack([d["lm loss"] for d in losses]).mean()) if losses else 0.0])
    # the loss lives on the last stage: share it along the pipeline, average over data parallel
    dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    reg = torch.tensor([sum(regs) / max(1, len(regs))])
    dist.all_reduce(reg, group=ps.get_model_parallel_group())  # every stage and TP shard
    return float(loss) / ps.get_data_parallel_world_size(), float(reg)


def _reduce_gradients(model, params) -> None:
    """Average gradients over data parallel; sum tied embeddings across the pipeline ends.

    Reduced one parameter at a time in fp32 (whatever the buffer's dtype), so the transient
    copy is one layer's, not the model's."""
    from megatron.core import parallel_state as ps

    def reduce(param, group, scale=1.0):
        grad = param.main_grad.float()
        dist.all_reduce(grad, group=group)
        param.main_grad.copy_(grad.mul_(scale) if scale != 1.0 else grad)

    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        for param in params:
            reduce(param, ps.get_data_parallel_group(), 1.0 / dp)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        for param in params:
            if getattr(param, "shared_embedding", False):
                reduce(param, ps.get_embedding_group())


def _clip_gradients(params, max_norm: float) -> float:
    """Global grad norm over all model-parallel ranks (TP duplicates counted once); clip."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = torch.zeros(1, dtype=torch.float64)
    for param in params:
        if param_is_not_tensor_parallel_duplicate(param):
            if getattr(param, "shared_embedding", False) and not ps.is_pipeline_first_stage():
                continue  # tied copy on the last stage: counted on the first
            total += param.main_grad.double().square().sum()
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    norm = float(total.sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for param in params:
            param.main_grad.mul_(max_norm / (norm + 1e-6))
    return norm


@torch.no_grad()
def evaluate(model, state, dataset, batches, seq_length, iters: int) -> float:
    """Mean LM loss with hard (argmax) masks on ``iters`` validation batches."""
    from megatron.core import parallel_state as ps

    from .evaluate import forward_passes
    from .layers import set_mask_mode

    modes = {id(layer): layer.mode for _, layer in sparse_layers(model)}
    if any(mode == "learn" for mode in modes.values()):
        set_mask_mode(model, "hard")
    try:
        total = forward_passes(model, dataset, batches, seq_length, iters, state.dp_rank)
    finally:
        for _, layer in sparse_layers(model):
            layer.mode = modes[id(layer)]
    value = torch.tensor([sum(total) / len(total) if total else 0.0])
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return float(value) / ps.get_data_parallel_world_size()


# ----------------------------------------------------------------------------- mask statistics


def _argmax_snapshot(model) -> dict[int, torch.Tensor]:
    return {id(layer): layer.mask_logits.detach().argmax(-1).to(torch.uint8)
            for _, layer in sparse_layers(model) if layer.mode == "learn"}


@torch.no_grad()
def _mask_statistics(model, previous: dict, state) -> dict:
    """Share of groups whose argmax flipped since the last log; mean max-probability of
    softmax(kappa * logits / tau) (the noise-free soft index)."""
    from megatron.core import parallel_state as ps

    sums = torch.zeros(3, dtype=torch.float64)  # flipped, max-prob sum, groups
    for _, layer in sparse_layers(model):
        if layer.mode != "learn":
            continue
        logits = layer.mask_logits.detach()
        argmax = logits.argmax(-1).to(torch.uint8)
        if id(layer) in previous:
            sums[0] += float((argmax != previous[id(layer)]).sum())
        probs = torch.softmax(state.kappa * logits / state.tau, dim=-1)
        sums[1] += float(probs.amax(-1).double().sum())
        sums[2] += argmax.numel()
    dist.all_reduce(sums, group=ps.get_model_parallel_group())
    groups = max(1.0, float(sums[2]))
    return {"flip_rate": float(sums[0]) / groups, "max_prob": float(sums[1]) / groups}


# ----------------------------------------------------------------------------- checkpoints


def _param_entries(model) -> dict[int, object]:
    """parameter id -> its entry (ShardedTensor or factory) in the model's sharded state dict."""
    from .checkpoint import _walk

    return {id(item.data): item for item in _walk(model.sharded_state_dict())
            if isinstance(getattr(item, "data", None), torch.nn.Parameter)}


def _optimizer_sharded_state(model, optimizer) -> dict:
    """Adam moments as sharded tensors laid out exactly like their parameters (reshardable).

    Dict keys are ``"{moment}:{index}"`` (index in optimizer order); checkpoint keys follow the
    parameter's, so stacked layers that share a key keep their own offsets.
    """
    entries = _param_entries(model)
    sharded = {}
    for index, param in enumerate(optimizer.params()):
        entry = entries.get(id(param))
        if entry is None:
            raise TrainingError("a trained parameter is missing from the sharded state dict")
        slot = optimizer.state[param]
        for name in ("exp_avg", "exp_avg_sq"):
            sharded[f"{name}:{index}"] = _entry_like(entry, f"optimizer.{name}.{entry.key}",
                                                    slot[name])
    return sharded


def save_checkpoint(model, optimizer, args: TrainArgs, iteration: int) -> Path:
    """Write ``iter_N`` atomically: a temporary directory renamed into place, then ``latest``.

    Refuses to write non-finite logits. Keeps the newest ``--keep-checkpoints``.
    """
    from megatron.core import dist_checkpointing

    for _, layer in sparse_layers(model):
        if layer.mode != "fixed" and not torch.isfinite(layer.mask_logits).all():
            raise TrainingError(f"iteration {iteration}: non-finite mask logits; not saving")
    root = Path(args.save)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier left this behind
        for part in ("model", "optimizer"):
            (tmp / part).mkdir(parents=True)
    dist.barrier()
    save_model(model, tmp / "model")
    dist_checkpointing.save(_optimizer_sharded_state(model, optimizer), str(tmp / "optimizer"))
    if rank0:
        (tmp / "train_state.json").write_text(json.dumps({
            "iteration": iteration, "seed": args.seed, "pattern": f"{args.N}:{args.M}",
            "consumed_samples": iteration * args.global_batch_size,
            "optimizer_steps": [int(optimizer.state[p]["step"]) for p in optimizer.params()],
            "optimizer_state": _optimizer_format(args),
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size}))
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # written last: the checkpoint is complete
        for old in sorted(root.glob("iter_???????"))[:-max(1, args.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(root: str | Path | None) -> Path | None:
    if root is None:
        return None
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "train_state.json").exists():
        raise TrainingError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def model_dir(path: str | Path) -> Path:
    """The model checkpoint inside ``path``: a run directory (its latest), an ``iter_N``
    directory, or a model checkpoint itself."""
    path = Path(path)
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / "model"
    if (path / "model" / "metadata.json").exists():
        return path / "model"
    return path


def _restore(args: TrainArgs, model, optimizer, pattern: NMPattern) -> int:
    """Resume from --save's latest checkpoint, else start from --load / --prior."""
    from megatron.core import dist_checkpointing

    resume = latest_checkpoint(args.save)
    if resume is not None:
        meta = json.loads((resume / "train_state.json").read_text())
        if meta["pattern"] != str(pattern) or meta["seed"] != args.seed:
            raise TrainingError(f"{resume} was written with pattern {meta['pattern']} and seed "
                                f"{meta['seed']}; this run uses {pattern} and {args.seed}")
        if meta.get("optimizer_state") != _optimizer_format(args):
            raise TrainingError(f"{resume} holds optimizer state {meta.get('optimizer_state')}; "
                                f"this run asks for {_optimizer_format(args)}")
        params = optimizer.params()
        if len(meta["optimizer_steps"]) != len(params):
            raise TrainingError(f"{resume} has optimizer state for {len(meta['optimizer_steps'])}"
                                f" parameters; this run trains {len(params)}")
        load_model(model, resume / "model")
        sharded = _optimizer_sharded_state(model, optimizer)
        loaded = dist_checkpointing.load(sharded, str(resume / "optimizer"))
        for index, param in enumerate(params):
            slot = optimizer.state[param]
            for name in ("exp_avg", "exp_avg_sq"):
                value = loaded[f"{name}:{index}"]
                if value is not slot[name]:
                    slot[name].copy_(value)
            slot["step"] = torch.tensor(float(meta["optimizer_steps"][index]))
        return int(meta["iteration"])
    if args.load:
        load_model(model, model_dir(args.load), missing_masks="keep")
    if args.prior:
        apply_prior_checkpoint(model, model_dir(args.prior), args.prior_strength)
    return 0


def _optimizer_format(args: TrainArgs) -> dict:
    return {"main_grads_dtype": args.main_grads_dtype, "exp_avg_dtype": args.exp_avg_dtype,
            "exp_avg_sq_dtype": args.exp_avg_sq_dtype, "second_moment": args.second_moment,
            "train_weights": args.train_weights}


def _entry_like(entry, key: str, data: torch.Tensor):
    """An entry laid out like ``entry`` (a logits entry) for ``data``, whose last axis is the
    same, of size 1 (per-group Adam moment) or absent (``mask_indices``). The last axis is
    never sharded, so offsets and fragmentation carry over."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(entry, ShardedTensor):  # SwiGLU factory: rebuilt from the data's shape
        return dataclasses.replace(entry, key=key, data=data)
    if data.shape == entry.data.shape:  # a moment shaped like its parameter (any axis sharded)
        return dataclasses.replace(entry, key=key, data=data, dtype=data.dtype)
    if data.dim() == entry.data.dim():
        last = lambda shape, size: tuple(shape[:-1]) + (size,)  # noqa: E731
        return dataclasses.replace(
            entry, key=key, data=data, dtype=data.dtype,
            local_shape=last(entry.local_shape, data.shape[-1]),
            global_shape=last(entry.global_shape, data.shape[-1]))
    return dataclasses.replace(
        entry, key=key, data=data, dtype=data.dtype, local_shape=entry.local_shape[:-1],
        global_shape=entry.global_shape[:-1], global_offset=entry.global_offset[:-1],
        axis_fragmentations=(entry.axis_fragmentations[:-1]
                             if entry.axis_fragmentations is not None else None))


@torch.no_grad()
def apply_prior_checkpoint(model, path: str | Path, strength: float) -> None:
    """Bias the logits towards the hard masks stored in ``path``: fixed masks
    (``mask_indices``, e.g. a trimmed run or a one-shot pruner) or the argmax of another
    run's logits (the paper's downstream transfer). Works at any TP x PP layout."""
    from megatron.core import dist_checkpointing

    from .layers import LOGITS_INIT_STD
    from .nm import indices_to_mask

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    entries = _param_entries(model)
    request, kinds = {}, {}
    layers = [layer for _, layer in sparse_layers(model)]
    for index, layer in enumerate(layers):  # dict keys per layer: stacked layers share a key
        entry = entries[id(layer.mask_logits)]
        indices_key = entry.key[: -len(".mask_logits")] + ".mask_indices"
        if entry.key in stored:
            request[str(index)] = dataclasses.replace(entry, data=torch.empty_like(entry.data))
            kinds[index] = "logits"
        elif indices_key in stored:
            request[str(index)] = _entry_like(
                entry, indices_key, torch.empty(entry.data.shape[:-1], dtype=torch.uint8))
            kinds[index] = "indices"
        else:
            raise TrainingError(f"prior {path} has no mask for {entry.key}")
    loaded = dist_checkpointing.load(request, str(path))
    for index, layer in enumerate(layers):
        value = loaded[str(index)]
        indices = value.argmax(-1) if kinds[index] == "logits" else value.long()
        pattern = layer.mask_settings.pattern
        layer.mask_logits.copy_(apply_prior(layer.mask_logits, indices_to_mask(indices, pattern),
                                            pattern, strength, scale=LOGITS_INIT_STD))


# ----------------------------------------------------------------------------- what users see


def memory_table(model, optimizer) -> list[tuple[str, int]]:
    """(what, bytes) of this rank's training state; the last row is bytes per prunable weight.

    Trained parameters, their gradient buffers and Adam moments count as training state; the
    frozen weights are listed but not counted (they are the model, not the training)."""
    prunable = frozen = 0
    for _, layer in sparse_layers(model):
        prunable += layer.weight.numel()
        if not layer.weight.requires_grad:
            frozen += layer.weight.numel() * layer.weight.element_size()
    held = optimizer.state_bytes()
    rows = [("frozen sparse weights", frozen), ("trained parameters", held["param"]),
            ("gradients (main_grad)", held["main_grad"]), ("Adam exp_avg", held["exp_avg"]),
            ("Adam exp_avg_sq", held["exp_avg_sq"])]
    return rows + [("per prunable weight", sum(held.values()) / max(1, prunable))]


def _print_memory_table(model, optimizer, args: TrainArgs) -> None:
    rows = memory_table(model, optimizer)
    fmt = _optimizer_format(args)
    print(f"training state on rank 0 (mask gradients {fmt['main_grads_dtype']}, exp_avg "
          f"{fmt['exp_avg_dtype']}, exp_avg_sq {fmt['exp_avg_sq_dtype']} per "
          f"{fmt['second_moment']})")
    for name, value in rows[:-1]:
        print(f"  {name:<24} {value / 2**20:10.2f} MiB")
    print(f"  {'per prunable weight':<24} {rows[-1][1]:10.2f} bytes "
          "(trained parameters + gradients + Adam state; goal <= 13)")


class _Logger:
    """Progress bar, JSONL log and TensorBoard scalars on rank 0; PNG curves at the end."""

    def __init__(self, args: TrainArgs, active: bool, start: int):
        self.active, self.args = active, args
        self.records: list[dict] = []
        self.jsonl = self.bar = self.board = None
        if not active:
            return
        out = Path(args.save) if args.save else None
        if out:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = (out / "train_log.jsonl").open("a")
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(args.tensorboard_dir)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard scalars")
        from tqdm import tqdm

        self.bar = tqdm(total=args.train_iters, initial=start, desc="mask learning",
                        disable=not args.progress, dynamic_ncols=True)
        self.started = time.time()

    def note(self, message: str) -> None:
        if self.active:
            (self.bar.write if self.bar else print)(message)

    def log(self, metrics: dict) -> None:
        if not self.active:
            return
        self.records.append(dict(metrics))
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        if self.board:
            for key, value in metrics.items():
                if key != "iteration":
                    self.board.add_scalar(f"train/{key}", value, metrics["iteration"])
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                              ("loss", "tau", "kappa", "lr", "flip_rate", "max_prob")
                              if k in metrics}, refresh=False)
        self.bar.update(metrics["iteration"] - self.bar.n)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.board:
            self.board.close()
        if self.args.save and self.records:
            plot_training_log(Path(self.args.save) / "train_log.jsonl",
                              Path(self.args.save) / "train_curves.png")


def plot_training_log(log_path: Path, png_path: Path) -> Path | None:
    """Loss and flip-rate curves from a JSONL log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    its = [r["iteration"] for r in rows]
    axes[0].plot(its, [r["loss"] for r in rows], label="train loss")
    val = [(r["iteration"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val, strict=True), "o-", label="val loss (hard masks)")
    axes[0].set_xlabel("iteration")
    axes[0].legend()
    flips = [(r["iteration"], r["flip_rate"]) for r in rows if "flip_rate" in r]
    if flips:
        axes[1].plot(*zip(*flips, strict=True))
        axes[1].set_yscale("log")
    axes[1].set_xlabel("iteration")
    axes[1].set_title("share of groups whose argmax flipped")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path

