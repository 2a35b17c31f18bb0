"""Step time of mask learning vs forward+backward of the same frozen dense model (CPU or GPU).

Every run goes through megatron's schedule with the same model, weights and tokens, as the
trainer does:

* frozen dense: only the embedding requires a gradient, so backward propagates through every
  layer (as mask learning must) with one GEMM per linear (the input gradient);
* dense training: the weights require gradients too (two GEMMs per linear in backward);
* mask learning, forward+backward: the logits require gradients, wrapped in megatron's DDP with
  the trainer's sharded optimizer attached (the sampler adds the logits gradients into the
  bf16 gradient buffer). Their gradient needs dL/d(W*mask) for every weight, which is a
  weight-gradient GEMM: mask learning does the GEMMs of dense training plus the sampler, so
  ``dense training / frozen dense`` is its floor;
* mask learning, whole step: plus megatron's grad norm, clipping, the AdamW update of the
  logits and DDP's parameter all-gather;
* the same two with distillation (``--kd-weight``): the micro-batch doubled (student with the
  mask, teacher with the plain weights under no_grad), the loss the trainer's
  ``distillation_loss`` (vocab-parallel cross-entropy and KL) on the logits.

Prints the medians and ratios, the bytes of training state per prunable weight, the memory of
each run: the activations autograd keeps for backward (counted through saved-tensor hooks,
parameters excluded; any device) and the peak (on a GPU: ``max_memory_allocated``; on the CPU:
the process's peak resident set, reset before each run where Linux allows it, which includes
the interpreter and the model), and the cost of distillation (time and memory, on vs off), and
writes JSON.

    python bench/bench_train_step.py [--device auto|cpu|cuda] [--layers 4 --hidden 256 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    device = distributed.select_device(args.device)
    with cpu_shims() if device.type == "cpu" else contextlib.nullcontext():
        result = run(args, device)
        distributed.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def run(args, device: torch.device) -> dict:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cuda_literals
    from maskllm_megatron.model.build import build_model
    from maskllm_megatron.model.config import ModelConfig, TransformerFields
    from maskllm_megatron.model.layers import (
        MaskSettings,
        SamplingState,
        assign_layer_ids,
        sampling,
        set_mask_mode,
        sparse_layers,
    )
    from maskllm_megatron.training.distill import Distillation, distillation_loss
    from maskllm_megatron.training.grads import wrap_model
    from maskllm_megatron.training.optim import ShardedAdamW, state_format

    distributed.init_distributed(1, 1, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(transformer=TransformerFields(num_layers=args.layers,
                                                    hidden_size=args.hidden,
                                                    num_attention_heads=max(1, args.hidden // 64),
                                                    activation="gelu"),
                      vocab_size=args.vocab, max_sequence_length=args.seq)
    model = build_model(cfg, MaskSettings(), device=device, params_dtype=dtype)
    assign_layer_ids(model, logits_seed=1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)

    loss_mask = torch.ones(args.batch, args.seq, device=device)
    kd = Distillation(args.kd_weight, args.kd_temperature)
    iteration = 0

    def forward_backward(chunk, distil: bool = False) -> None:
        def forward_step(data_iterator, module):
            state = SamplingState(seed=1, iteration=iteration, teacher_half=distil)
            with sampling(state):
                if distil:  # the trainer's doubled micro-batch: student, then teacher
                    output = module(torch.cat([tokens, tokens]), torch.cat([positions] * 2),
                                    None)
                    return output, functools.partial(distillation_loss, labels=tokens,
                                                     loss_mask=loss_mask, kd=kd)
                output = module(tokens, positions, None, labels=tokens)
            return output, lambda out: (out.float().mean(), {})

        with cuda_literals():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[chunk],
                num_microbatches=1, seq_length=args.seq,
                micro_batch_size=args.batch * (2 if distil else 1), forward_only=False)

    def saved_activations_mib(step) -> float:
        """What autograd keeps for backward during one step: the tensors its saved-tensor
        hooks see (one micro-batch: all alive together before backward), parameters excluded."""
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
        return sum(storages.values()) / 2**20

    def timed(step) -> tuple[float, float | None, float]:
        nonlocal iteration
        saved = saved_activations_mib(step)  # also the warm-up (kernels, buffers)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        times = []
        for i in range(args.repeats):
            iteration = i
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                else peak_rss_gib())
        return statistics.median(times), peak, saved

    def requires(predicate) -> None:
        for name, param in model.named_parameters():
            param.requires_grad_(predicate(name))
            param.grad = None

    set_mask_mode(model, "dense")
    requires(lambda name: "word_embeddings" in name)
    frozen = timed(lambda: forward_backward(model))
    requires(lambda name: "word_embeddings" in name or not name.endswith("mask_logits"))
    training = timed(lambda: forward_backward(model))

    set_mask_mode(model, "learn")
    requires(lambda name: name.endswith("mask_logits"))
    fmt = state_format()
    chunk = wrap_model(model, fmt.main_grads_dtype)
    config = model.config
    config.no_sync_func, config.grad_sync_func = chunk.no_sync, chunk.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = ShardedAdamW([chunk], fmt, lr=1e-3)

    def mask_forward_backward(distil: bool = False) -> None:
        optimizer.zero_grad()
        forward_backward(chunk, distil)

    def mask_step(distil: bool = False) -> None:
        mask_forward_backward(distil)
        norm = optimizer.grad_norm()
        optimizer.clip_grads(1.0, norm)
        optimizer.step()

    learn = timed(mask_forward_backward)
    whole = timed(mask_step)
    learn_kd = timed(lambda: mask_forward_backward(True))
    whole_kd = timed(lambda: mask_step(True))
    prunable = sum(layer.weight.numel() for _, layer in sparse_layers(model))
    state_bytes = sum(optimizer.state_bytes().values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    runs = {"frozen dense": frozen, "dense training": training,
            "mask learning fwd+bwd": learn, "mask learning step": whole,
            "mask + KD fwd+bwd": learn_kd, "mask + KD step": whole_kd}
    has_peak = frozen[1] is not None
    result = dict(
        device=name, dtype=str(dtype).removeprefix("torch."), tokens=args.batch * args.seq,
        layers=args.layers, hidden=args.hidden, vocab=args.vocab,
        threads=torch.get_num_threads(),
        seconds={k: v[0] for k, v in runs.items()},
        peak_gib={k: v[1] for k, v in runs.items()} if has_peak else None,
        saved_activations_mib={k: v[2] for k, v in runs.items()},
        peak_memory=("cuda max_memory_allocated" if device.type == "cuda"
                     else "process peak resident set (VmHWM)") if has_peak else None,
        ratio_vs_frozen={k: v[0] / frozen[0] for k, v in runs.items()},
        gemm_floor_vs_frozen=training[0] / frozen[0],
        step_vs_dense_training=whole[0] / training[0],
        kd=dict(weight=kd.weight, temperature=kd.temperature,
                step_seconds_off=whole[0], step_seconds_on=whole_kd[0],
                step_time_ratio=whole_kd[0] / whole[0],
                fwd_bwd_time_ratio=learn_kd[0] / learn[0],
                peak_gib_off=whole[1], peak_gib_on=whole_kd[1],
                peak_ratio=whole_kd[1] / whole[1] if has_peak else None,
                saved_activations_mib_off=whole[2], saved_activations_mib_on=whole_kd[2],
                saved_activations_ratio=whole_kd[2] / whole[2]),
        prunable_weights=prunable, state_bytes_per_prunable_weight=state_bytes / prunable)
    print(f"{name}, {result['dtype']} weights, {args.layers} layers x hidden {args.hidden}, "
          f"{result['tokens']} tokens, vocab {args.vocab}")
    print(f"{'run':<24} {'median s':>9} {'x frozen':>9} {'saved MiB':>10}"
          + (f" {'peak GiB':>9}" if has_peak else ""))
    for label, (seconds, peak, saved) in runs.items():
        print(f"{label:<24} {seconds:9.4f} {seconds / frozen[0]:9.2f} {saved:10.1f}"
              + (f" {peak:9.2f}" if peak is not None else ""))
    print(f"mask learning step: {result['ratio_vs_frozen']['mask learning step']:.2f}x frozen "
          f"dense (the weight-gradient GEMM alone costs {result['gemm_floor_vs_frozen']:.2f}x),"
          f" {result['step_vs_dense_training']:.2f}x dense training")
    print(f"distillation (a={kd.weight:g}, T={kd.temperature:g}): step "
          f"{result['kd']['step_time_ratio']:.2f}x the step without it, activations saved "
          f"for backward {whole[2]:.1f} -> {whole_kd[2]:.1f} MiB "
          f"({result['kd']['saved_activations_ratio']:.2f}x)"
          + (f", peak memory {whole[1]:.2f} -> {whole_kd[1]:.2f} GiB "
             f"({result['kd']['peak_ratio']:.2f}x)" if has_peak else ""))
    print(f"state {result['state_bytes_per_prunable_weight']:.2f} bytes per prunable weight "
          f"(DP=1; logits + gradient buffer + Adam moments)")
    return result


def reset_peak_rss() -> None:
    """Linux: start the process's peak resident set (VmHWM) over from the current one."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float | None:
    """The process's peak resident set since the last reset, or None where unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return None


if __name__ == "__main__":
    sys.exit(main())
