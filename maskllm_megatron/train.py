"""The mask-learning trainer on megatron-core's training machinery, with exact resume.

Story of one run (:func:`train`):

1. choose this rank's device, start distributed work and build the model there from
   ``model_config.json`` with sparse layers, frozen weights in the run's dtype;
2. wrap it in megatron's DDP (bucketed gradient buffers, reduce-scatter overlapped with
   backward) and give the optimizer this rank's slice of every bucket (:mod:`.optim`);
3. load the newest checkpoint in ``--save`` (exact resume) or else ``--load`` (dense weights) and
   ``--prior`` (bias the logits towards a hard mask);
4. each iteration: tau / kappa from the iteration, the learning rate from megatron's
   ``OptimizerParamScheduler``; megatron's forward-backward over the micro-batches (each
   micro-batch draws its own sample, each data-parallel rank too), the sparse-weight
   regulariser of *every* pipeline stage, ``finalize_model_grads``; megatron's grad norm and
   clipping; non-finite steps refused; AdamW on this rank's slices, parameters all-gathered;
5. log (progress bar, JSONL, TensorBoard), save atomically, and plot at the end.

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
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from . import runtime
from .checkpoint import load_model, parameter_entries, save_model
from .cpu_shims import cuda_literals
from .data.datasets import BatchLayout, batch_for, build_gpt_datasets
from .data.tokenizer import load_tokenizer
from .grads import wrap_model
from .layers import (
    LOGITS_INIT_STD,
    MaskSettings,
    SamplingState,
    attach_sampling,
    regularizer,
    set_mask_mode,
    sparse_layers,
)
from .model_config import ModelConfig, copy_model_files
from .nm import NMPattern, apply_prior, indices_to_mask
from .optim import MOMENTS, ShardedAdamW, moment_entries, state_format
from .schedules import GumbelSchedule
from .spec import TRANSFORMER_IMPLS, build_model


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

    def validate(self) -> None:
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError("--lr-decay-style must be cosine, linear or constant")
        if self.dense and not self.train_weights:
            raise ValueError("--dense (masks off) only makes sense with --train-weights")
        state_format(self.main_grads_dtype, self.exp_avg_dtype, self.exp_avg_sq_dtype)
        if self.device not in runtime.DEVICES:
            raise ValueError(f"--device must be one of {', '.join(runtime.DEVICES)}")
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


# ----------------------------------------------------------------------------- schedules


def lr_scheduler(optimizer, args: TrainArgs) -> OptimizerParamScheduler:
    """megatron's scheduler, counted in iterations: iteration ``i`` runs at its step ``i``."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=min(args.min_lr, args.lr), lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")


class _AuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` into ``aux`` (megatron's
    MoE aux-loss idiom): adds a stage-local term to the loss on any pipeline stage."""

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_device = aux.shape, aux.device
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32,
                                       device=ctx.aux_device), None


# ----------------------------------------------------------------------------- the run


def train(args: TrainArgs) -> dict:
    """Run (or resume) training; returns the final metrics."""
    layout = runtime.init_distributed(args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, args.seed,
                                      device=args.device)
    main_rank = layout.rank == 0
    model_cfg = _model_config(args)
    seq_length = args.seq_length or model_cfg.max_sequence_length
    if args.sequence_parallel and seq_length % layout.tp:
        raise ValueError(f"--sequence-parallel splits the sequence over {layout.tp} TP ranks: "
                         f"--seq-length {seq_length} must be a multiple of it")
    pattern = NMPattern(args.N, args.M)
    model, state = _build_model(args, model_cfg, layout)
    chunk, optimizer = _optimizer(model, args, layout.device)
    scaler = _grad_scaler(args, model.config)
    scheduler = lr_scheduler(optimizer, args)
    start = _restore(args, model, optimizer, scaler, pattern)
    scheduler.step(start)
    if main_rank:
        _print_memory_table(model, optimizer, args)

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
        lr = optimizer.param_groups[0]["lr"]
        reg_weight = args.weight_reg * (1.0 - iteration / args.train_iters)
        optimizer.zero_grad()
        loss, reg = _forward_backward(chunk, state, train_ds, batches, iteration, seq_length,
                                      reg_weight, layout.device)
        refusal, grad_norm = _check_step(optimizer, scaler, loss)
        if refusal is None:
            if args.clip_grad > 0:
                optimizer.clip_grads(args.clip_grad, grad_norm)
            optimizer.step()
        scheduler.step(1)  # the next iteration's lr, whether this step was taken or refused
        if refusal is not None:
            if refusal.startswith("fp16"):
                logger.note(f"iteration {iteration}: {refusal}")
                continue
            skipped += 1
            if skipped > args.skip_nonfinite_steps:
                logger.close()
                raise TrainingError(f"iteration {iteration}: {refusal}; {skipped} such steps "
                                    f"exceed --skip-nonfinite-steps={args.skip_nonfinite_steps}")
            logger.note(f"iteration {iteration}: {refusal}")
            continue
        step = iteration + 1
        metrics = dict(iteration=step, loss=loss, reg=reg, lr=lr, tau=state.tau,
                       kappa=state.kappa, grad_norm=grad_norm, skipped=skipped)
        if args.log_interval and step % args.log_interval == 0:
            metrics.update(_mask_statistics(model, previous_argmax, state))
            previous_argmax = _argmax_snapshot(model)
        if args.eval_interval and valid_ds is not None and step % args.eval_interval == 0:
            metrics["val_loss"] = evaluate(chunk, state, valid_ds, batches, seq_length,
                                           args.eval_iters)
        logger.log(metrics)
        leaving = bool(args.exit_interval) and step % args.exit_interval == 0
        if args.save and (step == args.train_iters or leaving or
                          (args.save_interval and step % args.save_interval == 0)):
            save_checkpoint(model, optimizer, scaler, args, step)
        if leaving:
            break
    logger.close()
    return metrics


# ----------------------------------------------------------------------------- building


def _model_config(args: TrainArgs) -> ModelConfig:
    source = args.model_config or args.load
    if source is None:
        raise ValueError("give --model-config (or --load with a model_config.json)")
    return ModelConfig.load(source)


def _build_model(args: TrainArgs, cfg: ModelConfig, layout):
    torch.manual_seed(args.seed)
    settings = MaskSettings(pattern=NMPattern(args.N, args.M),
                            mode="dense" if args.dense else "learn",
                            hard_sampling=args.hard_sampling)
    model = build_model(cfg, settings, tp=layout.tp, pp=layout.pp, device=layout.device,
                        params_dtype=runtime.params_dtype(args, layout.device),
                        sequence_parallel=args.sequence_parallel,
                        transformer_impl=args.transformer_impl)
    state = SamplingState(seed=args.seed, dp_rank=layout.dp_rank)
    attach_sampling(model, state)
    return model, state


def _optimizer(model, args: TrainArgs, device: torch.device) -> tuple:
    """Mask logits only, unless --train-weights: nothing else gets gradients, DDP buffers or
    Adam state. Returns (the DDP-wrapped model chunk, the optimizer).

    The reduction overlaps backward on GPUs; on the CPU there is nothing to overlap it with
    (gloo's threads would only compete with the computation for the same cores)."""
    learned = 0
    for name, param in model.named_parameters():
        # logits learn unless the masks are off; other parameters only with --train-weights
        learn = not args.dense if name.endswith("mask_logits") else args.train_weights
        param.requires_grad_(learn)
        learned += learn
    if not learned:
        raise TrainingError("nothing to train: the model has no sparse layers")
    fmt = state_format(args.main_grads_dtype, args.exp_avg_dtype, args.exp_avg_sq_dtype)
    overlap = args.overlap_grad_reduce
    chunk = wrap_model(model, fmt.main_grads_dtype,
                       device.type == "cuda" if overlap is None else overlap)
    config = model.config  # megatron's schedules drive the gradient reduction through these
    config.no_sync_func = chunk.no_sync
    config.grad_sync_func = chunk.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = ShardedAdamW([chunk], fmt, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps, weight_decay=args.weight_decay)
    return chunk, optimizer


def _grad_scaler(args: TrainArgs, config):
    """megatron's loss scaler for fp16 runs (constant with --loss-scale, else dynamic)."""
    if not args.fp16:
        return None
    with cuda_literals():
        scaler = (ConstantGradScaler(args.loss_scale) if args.loss_scale else
                  DynamicGradScaler(initial_scale=args.initial_loss_scale, min_scale=1.0,
                                    growth_factor=2.0, backoff_factor=0.5, growth_interval=1000,
                                    hysteresis=2))
    config.grad_scale_func = lambda loss: loss * scaler.scale
    return scaler


def _check_step(optimizer: ShardedAdamW, scaler, loss: float) -> tuple[str | None, float]:
    """``(why the step must not be taken or None, gradient norm)``, the same on every rank.

    fp16: undo the loss scale; an overflow lowers the scale and skips the step (megatron's
    rule). Otherwise a non-finite loss or gradient refuses it."""
    if scaler is not None:
        inverse = float(scaler.inv_scale)
        for s in optimizer.slices:
            s.decoupled_grad.mul_(inverse)
    grad_norm = optimizer.grad_norm()
    if scaler is not None:
        overflow = not math.isfinite(grad_norm)
        with cuda_literals():
            scaler.update(overflow)
        if overflow:
            return (f"fp16 gradients overflowed; loss scale now {float(scaler.scale):g}, "
                    "step skipped"), grad_norm
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(loss) else "gradient"
        return (f"non-finite {what} (loss={loss}, grad norm={grad_norm}); step refused",
                grad_norm)
    return None, grad_norm


# ----------------------------------------------------------------------------- one step


def _forward_backward(chunk, state, dataset, batches, iteration, seq_length, reg_weight,
                      device) -> tuple[float, float]:
    """megatron's forward-backward over this iteration's micro-batches; (loss, regulariser)
    averaged over micro-batches and data parallel, the same on every rank."""
    microbatch = iter(range(batches.num_microbatches))
    regs: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        k = next(microbatch)
        state.microbatch = k
        batch = batch_for(dataset, batches, iteration, k, state.dp_rank, device)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        reg = regularizer(model)
        if reg is not None:
            regs.append(reg.detach())
            if reg_weight > 0:  # this stage's (and TP shard's) term, on every stage
                output = _AuxLoss.apply(output, reg, reg_weight / batches.num_microbatches)
        mask = batch["loss_mask"].float()

        def loss_func(output_tensor):
            loss = (output_tensor.float() * mask).sum() / mask.sum()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    with cuda_literals():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=None, model=[chunk],
            num_microbatches=batches.num_microbatches, seq_length=seq_length,
            micro_batch_size=batches.micro_batch_size, forward_only=False)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if losses:  # the loss lives on the last stage: share it along the pipeline
        totals[0] = torch.stack([d["lm loss"] for d in losses]).double().mean()
    if regs:
        totals[1] = torch.stack(regs).double().mean()
    dist.all_reduce(totals[:1], group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(totals[:1], group=ps.get_data_parallel_group())
    dist.all_reduce(totals[1:], group=ps.get_model_parallel_group())  # every stage, TP shard
    loss, reg = totals.tolist()
    return loss / ps.get_data_parallel_world_size(), reg


@torch.no_grad()
def evaluate(chunk, state, dataset, batches, seq_length, iters: int) -> float:
    """Mean LM loss with hard (argmax) masks on ``iters`` validation batches."""
    from .evaluate import forward_passes

    device = runtime.device()
    modes = {id(layer): layer.mode for _, layer in sparse_layers(chunk)}
    if any(mode == "learn" for mode in modes.values()):
        set_mask_mode(chunk, "hard")
    try:
        total = forward_passes(chunk, dataset, batches, seq_length, iters, state.dp_rank)
    finally:
        for _, layer in sparse_layers(chunk):
            layer.mode = modes[id(layer)]
    value = torch.tensor([sum(total) / len(total) if total else 0.0], dtype=torch.float64,
                         device=device)
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
    softmax(kappa * logits / tau) (the noise-free soft index). One host sync in all."""
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device())  # flips, max-p, groups
    for _, layer in sparse_layers(model):
        if layer.mode != "learn":
            continue
        logits = layer.mask_logits.detach()
        argmax = logits.argmax(-1).to(torch.uint8)
        if id(layer) in previous:
            sums[0] += (argmax != previous[id(layer)]).sum()
        probs = torch.softmax(state.kappa * logits / state.tau, dim=-1)
        sums[1] += probs.amax(-1).double().sum()
        sums[2] += argmax.numel()
    dist.all_reduce(sums, group=ps.get_model_parallel_group())
    flips, max_prob, groups = sums.tolist()
    groups = max(1.0, groups)
    return {"flip_rate": flips / groups, "max_prob": max_prob / groups}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(model, optimizer: ShardedAdamW, scaler, args: TrainArgs,
                    iteration: int) -> Path:
    """Write ``iter_N`` atomically: a temporary directory renamed into place, then ``latest``.

    The Adam moments are gathered over data parallel and stored laid out like their
    parameters (megatron's "fully reshardable" format). Refuses to write non-finite logits.
    Keeps the newest ``--keep-checkpoints``.
    """
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
    moments = optimizer.gather_moments()
    dist_checkpointing.save(moment_entries(parameter_entries(model), optimizer.params(), moments),
                            str(tmp / "optimizer"))
    del moments
    if rank0:
        (tmp / "train_state.json").write_text(json.dumps({
            "iteration": iteration, "seed": args.seed, "pattern": f"{args.N}:{args.M}",
            "consumed_samples": iteration * args.global_batch_size,
            "optimizer_step": optimizer.step_count,
            "optimizer_state": _optimizer_format(args),
            "loss_scaler": _scaler_state(scaler),
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": ps.get_data_parallel_world_size()}))
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


def _restore(args: TrainArgs, model, optimizer: ShardedAdamW, scaler, pattern: NMPattern) -> int:
    """Resume from --save's latest checkpoint, else start from --load / --prior."""
    resume = latest_checkpoint(args.save)
    if resume is not None:
        meta = json.loads((resume / "train_state.json").read_text())
        if meta["pattern"] != str(pattern) or meta["seed"] != args.seed:
            raise TrainingError(f"{resume} was written with pattern {meta['pattern']} and seed "
                                f"{meta['seed']}; this run uses {pattern} and {args.seed}")
        if meta.get("optimizer_state") != _optimizer_format(args):
            raise TrainingError(f"{resume} holds optimizer state {meta.get('optimizer_state')}; "
                                f"this run asks for {_optimizer_format(args)}")
        load_model(model, resume / "model")
        params = optimizer.params()
        entries = parameter_entries(model)
        empty = {id(p): {name: torch.empty(p.shape, dtype=getattr(optimizer.format,
                                                                 f"{name}_dtype"))
                         for name in MOMENTS} for p in params}
        loaded = dist_checkpointing.load(moment_entries(entries, params, empty),
                                         str(resume / "optimizer"))
        moments = {id(p): {name: loaded[f"{name}:{index}"] for name in MOMENTS}
                   for index, p in enumerate(params)}
        optimizer.load_moments(moments, int(meta["optimizer_step"]))
        if scaler is not None and meta.get("loss_scaler"):
            with cuda_literals():
                scaler.load_state_dict({k: torch.tensor([v]) if k == "scale" else v
                                        for k, v in meta["loss_scaler"].items()})
        return int(meta["iteration"])
    if args.load:
        load_model(model, model_dir(args.load), missing_masks="keep")
    if args.prior:
        apply_prior_checkpoint(model, model_dir(args.prior), args.prior_strength)
    return 0


def _optimizer_format(args: TrainArgs) -> dict:
    fmt = state_format(args.main_grads_dtype, args.exp_avg_dtype, args.exp_avg_sq_dtype)
    return {**fmt.describe(), "train_weights": args.train_weights}


def _scaler_state(scaler) -> dict | None:
    if scaler is None:
        return None
    return {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}


@torch.no_grad()
def apply_prior_checkpoint(model, path: str | Path, strength: float) -> None:
    """Bias the logits towards the hard masks stored in ``path``: fixed masks
    (``mask_indices``, e.g. a trimmed run or a one-shot pruner) or the argmax of another
    run's logits (the paper's downstream transfer). Works at any TP x PP layout."""
    stored = dist_checkpointing.load_tensors_metadata(str(path))
    entries = parameter_entries(model)
    request, kinds = {}, {}
    layers = [layer for _, layer in sparse_layers(model)]
    for index, layer in enumerate(layers):  # dict keys per layer: stacked layers share a key
        entry = entries[id(layer.mask_logits)]
        indices_key = entry.key[: -len(".mask_logits")] + ".mask_indices"
        if entry.key in stored:
            request[str(index)] = dataclasses.replace(entry, data=torch.empty_like(entry.data))
            kinds[index] = "logits"
        elif indices_key in stored:
            request[str(index)] = _indices_entry(
                entry, indices_key,
                torch.empty(entry.data.shape[:-1], dtype=torch.uint8, device=entry.data.device))
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


def _indices_entry(entry, key: str, data: torch.Tensor):
    """An entry laid out like ``entry`` (a logits entry) for fixed-mask indices, which lack the
    candidate axis; that axis is never sharded, so offsets and fragmentation carry over."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(entry, ShardedTensor):  # SwiGLU factory: rebuilt from the data's shape
        return dataclasses.replace(entry, key=key, data=data)
    return dataclasses.replace(
        entry, key=key, data=data, dtype=data.dtype, local_shape=entry.local_shape[:-1],
        global_shape=entry.global_shape[:-1], global_offset=entry.global_offset[:-1],
        axis_fragmentations=(entry.axis_fragmentations[:-1]
                             if entry.axis_fragmentations is not None else None))


# ----------------------------------------------------------------------------- what users see


def memory_table(model, optimizer: ShardedAdamW) -> list[tuple[str, float]]:
    """(what, bytes) of this rank's training state; the last row is bytes per prunable weight.

    Trained parameters, their gradient buffers, Adam moments and main copies count as training
    state; the frozen weights are listed but not counted (they are the model)."""
    prunable = frozen = 0
    for _, layer in sparse_layers(model):
        prunable += layer.weight.numel()
        if not layer.weight.requires_grad:
            frozen += layer.weight.numel() * layer.weight.element_size()
    held = optimizer.state_bytes()
    rows = [("frozen sparse weights", frozen), ("trained parameters", held["param"]),
            ("gradient buffers (main_grad)", held["main_grad"]),
            ("Adam exp_avg (this DP slice)", held["exp_avg"]),
            ("Adam exp_avg_sq (this DP slice)", held["exp_avg_sq"])]
    if held["main_param"]:
        rows.append(("fp32 main copies (this DP slice)", held["main_param"]))
    return rows + [("per prunable weight", sum(held.values()) / max(1, prunable))]


def _print_memory_table(model, optimizer: ShardedAdamW, args: TrainArgs) -> None:
    rows = memory_table(model, optimizer)
    fmt = _optimizer_format(args)
    dp = ps.get_data_parallel_world_size()
    print(f"training state of rank 0 on {runtime.device()} (gradients "
          f"{fmt['main_grads_dtype']}, exp_avg {fmt['exp_avg_dtype']}, exp_avg_sq "
          f"{fmt['exp_avg_sq_dtype']}, sharded over DP {dp})")
    for name, value in rows[:-1]:
        print(f"  {name:<34} {value / 2**20:10.2f} MiB")
    print(f"  {'per prunable weight':<34} {rows[-1][1]:10.2f} bytes "
          "(trained parameters + gradients + optimizer state)")


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

