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
   regulariser of *every* pipeline stage subtracted with the paper's sign
   (``LM - lambda(t) * sum ||W * M~||^2``) and, with ``--kd-weight``, the distillation loss
   from the same model with its masks off (:mod:`.distill`), ``finalize_model_grads``;
   megatron's grad norm and clipping; non-finite steps refused; AdamW on this rank's slices,
   parameters all-gathered;
5. log (progress bar, JSONL, TensorBoard), save atomically, and plot at the end.

Everything that varies per step (noise keys, data position, schedules) is a pure function of
the iteration, so a checkpoint holds only tensors (logits, optimizer moments) and the iteration.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import verify_model_files
from maskllm_megatron.checkpoint.model import load_model, save_model
from maskllm_megatron.checkpoint.optimizer import load_moments, save_moments
from maskllm_megatron.checkpoint.prior import apply_prior_checkpoint
from maskllm_megatron.checkpoint.run_dir import (
    latest_checkpoint,
    model_dir,
    read_train_state,
    write_checkpoint,
)
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.core.schedules import GumbelSchedule
from maskllm_megatron.cpu_shims import cuda_literals
from maskllm_megatron.data.datasets import BatchLayout, build_gpt_datasets, parse_blend
from maskllm_megatron.data.tokenizer import load_tokenizer
from maskllm_megatron.errors import InputError, TrainingError
from maskllm_megatron.model.build import build_model, check_seq_length
from maskllm_megatron.model.config import ModelConfig, copy_model_files
from maskllm_megatron.model.layers import (
    MaskSettings,
    SamplingState,
    assign_layer_ids,
    sparse_layers,
)
from maskllm_megatron.paths import removed_on_failure, require_path
from maskllm_megatron.training.args import TrainArgs
from maskllm_megatron.training.distill import distillation
from maskllm_megatron.training.grads import wrap_model
from maskllm_megatron.training.metrics import (
    TrainingLog,
    argmax_snapshot,
    mask_statistics,
    print_memory_table,
)
from maskllm_megatron.training.optim import ShardedAdamW, state_format
from maskllm_megatron.training.step import (
    forward_backward,
    regularizer_weight,
    validation_loss,
)

FAULT_INJECTION = "MASKLLM_FAULT_INJECTION"


def fault_requested(point: str, iteration: int) -> bool:
    """Whether ``MASKLLM_FAULT_INJECTION=POINT:N`` asks for a fault at ``point`` of iteration
    N (a test hook; unset, never)."""
    return os.environ.get(FAULT_INJECTION) == f"{point}:{iteration}"


def inject_fault(point: str, iteration: int) -> None:
    """A node failure on demand, for resume tests: ``MASKLLM_FAULT_INJECTION=POINT:N`` (points:
    ``kill-after-iteration``, ``kill-during-save``) SIGKILLs every rank when the run reaches
    that point of iteration N; ``nan-loss:N`` makes iteration N's loss NaN on every rank (see
    :func:`train`). Unset, it does nothing."""
    if fault_requested(point, iteration):
        os.kill(os.getpid(), signal.SIGKILL)


def lr_scheduler(optimizer, args: TrainArgs) -> OptimizerParamScheduler:
    """megatron's scheduler, counted in iterations: iteration ``i`` runs at its step ``i``."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=min(args.min_lr, args.lr), lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")


def train(args: TrainArgs) -> dict:
    """Run (or resume) training in the running process group, laid out as the arguments ask;
    returns the final metrics. A run that fails before its first checkpoint removes the
    ``--save`` directory it made, so nothing half-made is left to resume from."""
    check_inputs(args)
    layout = distributed.use_layout(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, args.seed, what="train")
    with removed_on_failure(args.save, done=lambda: (Path(args.save) / "latest").exists()):
        return _train(args, layout)


def check_inputs(args: TrainArgs) -> None:
    """The paths the run reads, before anything is built: each missing one is named (also
    called by ``maskllm train`` before it imports a mask file as the prior)."""
    if args.model_config is None and args.load is None:
        raise InputError("give --model-config (or --load with a model_config.json)")
    for path, what in ((args.model_config, "model config (--model-config)"),
                       (args.load, "checkpoint (--load)"), (args.prior, "checkpoint (--prior)"),
                       (args.tokenizer, "tokenizer (--tokenizer)")):
        if path:
            require_path(path, what)
    if args.prior and Path(args.prior).is_file():  # a mask file: a checkpoint is needed
        raise InputError(f"--prior {args.prior} is a file; train() takes a checkpoint "
                         "directory (the `maskllm train` command imports mask files itself). "
                         "Import it first: deploy.import_masks.import_prior(FILE, LOAD, OUT), "
                         "or `maskllm import-masks FILE --load LOAD --save OUT` and --prior "
                         "OUT/masks")
    if not args.data_path:
        raise InputError("give --data-path: indexed datasets written by `maskllm preprocess`")
    for prefix in parse_blend(args.data_path)[0]:
        for suffix in (".bin", ".idx"):
            require_path(f"{prefix}{suffix}", "dataset file (run `maskllm preprocess` first)")


def _train(args: TrainArgs, layout) -> dict:
    main_rank = layout.rank == 0
    model_cfg = _model_config(args)
    seq_length = args.seq_length or model_cfg.max_sequence_length
    if args.sequence_parallel and seq_length % layout.tp:
        raise InputError(f"--sequence-parallel splits the sequence over {layout.tp} TP ranks: "
                         f"--seq-length {seq_length} must be a multiple of it")
    check_seq_length(model_cfg, seq_length)
    pattern = NMPattern(args.N, args.M)
    model = _build_model(args, model_cfg, layout)
    chunk, optimizer = _optimizer(model, args, layout.device)
    scaler = _grad_scaler(args, model.config)
    scheduler = lr_scheduler(optimizer, args)
    start = _restore(args, model, optimizer, scaler, pattern)
    scheduler.step(start)
    if main_rank:
        print_memory_table(model, optimizer, args)

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
    logger = TrainingLog(args, main_rank, start)
    previous_argmax = argmax_snapshot(model)
    kd = distillation(args.kd_weight, args.kd_temperature)  # None: off
    skipped = 0
    metrics: dict = {}
    for iteration in range(start, args.train_iters):
        state = SamplingState(seed=args.seed, iteration=iteration, dp_rank=layout.dp_rank,
                              tau=schedule.tau(iteration), kappa=schedule.kappa(iteration))
        lr = optimizer.param_groups[0]["lr"]
        reg_weight = regularizer_weight(args.weight_reg, iteration, args.train_iters)
        optimizer.zero_grad()
        loss, reg, extra = forward_backward(chunk, state, train_ds, batches, iteration,
                                             seq_length, reg_weight, layout.device, kd=kd)
        if fault_requested("nan-loss", iteration + 1):  # a diverged step, on every rank
            loss = float("nan")
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
                                    f"exceed --skip-nonfinite-steps={args.skip_nonfinite_steps}"
                                    "; check the --load weights and the data, lower --lr, or "
                                    "allow more skipped steps")
            logger.note(f"iteration {iteration}: {refusal}")
            continue
        step = iteration + 1
        # loss: the LM loss; reg: sum ||W * M~||^2; the step minimised loss - reg_weight * reg
        # (and, with --kd-weight a, (1 - a) * loss + a * kd_loss - reg_weight * reg)
        metrics = dict(iteration=step, loss=loss, lr=lr, grad_norm=grad_norm, skipped=skipped,
                       **extra)
        if not args.dense:  # masks off (dense pretraining): no mask schedule to report
            metrics.update(reg=reg, reg_weight=reg_weight, tau=state.tau, kappa=state.kappa)
        if args.log_interval and step % args.log_interval == 0 and not args.dense:
            metrics.update(mask_statistics(model, previous_argmax, state))
            previous_argmax = argmax_snapshot(model)
        if args.eval_interval and valid_ds is not None and step % args.eval_interval == 0:
            metrics["val_loss"] = validation_loss(chunk, state, valid_ds, batches, seq_length,
                                           args.eval_iters)
        logger.log(metrics)
        leaving = bool(args.exit_interval) and step % args.exit_interval == 0
        if args.save and (step == args.train_iters or leaving or
                          (args.save_interval and step % args.save_interval == 0)):
            save_checkpoint(model, optimizer, scaler, args, step)
        inject_fault("kill-after-iteration", step)
        if leaving:
            break
    logger.close()
    return metrics


# ----------------------------------------------------------------------------- building


def _model_config(args: TrainArgs) -> ModelConfig:
    source = args.model_config or args.load
    if source is None:
        raise InputError("give --model-config (or --load with a model_config.json)")
    verify_model_files(source)
    return ModelConfig.load(source)


def _build_model(args: TrainArgs, cfg: ModelConfig, layout):
    torch.manual_seed(args.seed)
    settings = MaskSettings(pattern=NMPattern(args.N, args.M),
                            mode="dense" if args.dense else "learn",
                            hard_sampling=args.hard_sampling)
    model = build_model(cfg, settings, tp=layout.tp, pp=layout.pp, device=layout.device,
                        params_dtype=distributed.params_dtype(args, layout.device),
                        sequence_parallel=args.sequence_parallel,
                        transformer_impl=args.transformer_impl)
    assign_layer_ids(model, logits_seed=args.seed)
    return model


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

    def write_tensors(tmp: Path) -> None:
        save_model(model, tmp / "model")
        inject_fault("kill-during-save", iteration)
        save_moments(model, optimizer, tmp / "optimizer")

    return write_checkpoint(args.save, iteration, write_tensors, {
        "iteration": iteration, "seed": args.seed, "pattern": f"{args.N}:{args.M}",
        "consumed_samples": iteration * args.global_batch_size,
        "optimizer_step": optimizer.step_count,
        "optimizer_state": args.optimizer_format(),
        "loss_scaler": _scaler_state(scaler),
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "data_parallel_size": ps.get_data_parallel_world_size()}, keep=args.keep_checkpoints)


def _restore(args: TrainArgs, model, optimizer: ShardedAdamW, scaler, pattern: NMPattern) -> int:
    """Resume from --save's latest checkpoint, else start from --load / --prior."""
    resume = latest_checkpoint(args.save)
    if resume is not None:
        meta = read_train_state(resume)
        if meta["pattern"] != str(pattern) or meta["seed"] != args.seed:
            raise TrainingError(f"{resume} was written with pattern {meta['pattern']} and seed "
                                f"{meta['seed']}; this run uses {pattern} and {args.seed}")
        if meta.get("optimizer_state") != args.optimizer_format():
            raise TrainingError(f"{resume} holds optimizer state {meta.get('optimizer_state')}; "
                                f"this run asks for {args.optimizer_format()}")
        load_model(model, resume / "model")
        load_moments(model, optimizer, resume / "optimizer", int(meta["optimizer_step"]))
        if scaler is not None and meta.get("loss_scaler"):
            with cuda_literals():
                scaler.load_state_dict({k: torch.tensor([v], device=distributed.device())
                                        if k == "scale" else v
                                        for k, v in meta["loss_scaler"].items()})
        return int(meta["iteration"])
    if args.load:
        load_model(model, model_dir(args.load), missing_masks="keep")
    if args.prior:
        apply_prior_checkpoint(model, model_dir(args.prior), args.prior_strength)
    return 0


def _scaler_state(scaler) -> dict | None:
    if scaler is None:
        return None
    return {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
