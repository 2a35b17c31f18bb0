"""Step time of mask learning vs a forward+backward of the same frozen dense model, on CPU.

All runs use the same model, weights and tokens:

* frozen dense: only the embedding requires a gradient, so backward propagates through every
  layer (as mask learning must) with one GEMM per linear (the input gradient);
* dense training: the weights require gradients too (two GEMMs per linear in backward);
* mask learning: the logits require gradients. Their gradient needs dL/d(W*mask) for every weight,
  which is a weight-gradient GEMM: mask learning does the GEMMs of dense training plus the
  sampler. Against frozen dense the GEMMs alone make 3/2 on the linear layers, so the
  ``ratio vs frozen`` floor is the measured ``dense training / frozen dense``; the sampler's own
  cost is ``ratio vs dense training``.

The script prints the medians and ratios (goal <= 1.25x) and the bytes of training state per
prunable weight of the trainer's optimizer (goal <= 13), and writes JSON.

    python bench/bench_train_step.py [--layers 4 --hidden 256 --seq 256 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    from maskllm_megatron import runtime
    from maskllm_megatron.layers import (
        MaskSettings,
        SamplingState,
        attach_sampling,
        set_mask_mode,
        sparse_layers,
    )
    from maskllm_megatron.model_config import ModelConfig
    from maskllm_megatron.optim import MaskAdamW, mask_state_format
    from maskllm_megatron.spec import build_gpt_model

    runtime.init_distributed(1, 1)
    cfg = ModelConfig(transformer=dict(num_layers=args.layers, hidden_size=args.hidden,
                                       num_attention_heads=max(1, args.hidden // 64),
                                       activation="gelu"),
                      vocab_size=args.vocab, max_sequence_length=args.seq)
    model = build_gpt_model(cfg.transformer_config(), args.vocab, args.seq, MaskSettings())
    state = SamplingState(seed=1)
    attach_sampling(model, state)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand(args.batch, args.seq)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()

    def timed(mode: str, train_weights: bool = False) -> float:
        set_mask_mode(model, mode)
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("mask_logits") if mode == "learn"
                                 else "word_embeddings" in name or train_weights)
        step()  # warm-up
        times = []
        for i in range(args.repeats):
            state.iteration = i
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    dense, training = timed("dense"), timed("dense", train_weights=True)
    layers = [layer for _, layer in sparse_layers(model)]
    prunable = sum(layer.weight.numel() for layer in layers)
    # the trainer's optimizer: its main_grad buffers make the sampler add the logits gradients
    # in place (gradient-accumulation fusion), as in training
    opt = MaskAdamW([{"params": [layer.mask_logits for layer in layers],
                      "format": mask_state_format()}])
    learn = timed("learn")
    state_bytes = sum(opt.state_bytes().values())
    result = dict(tokens=args.batch * args.seq, frozen_dense_s=dense, dense_training_s=training,
                  mask_learning_s=learn, ratio_vs_frozen=learn / dense,
                  gemm_floor_vs_frozen=training / dense, ratio_vs_dense_training=learn / training,
                  prunable_weights=prunable,
                  state_bytes_per_prunable_weight=state_bytes / prunable,
                  threads=torch.get_num_threads())
    print(f"{'run':<16} {'median s':>9} {'x frozen':>9}")
    for name, value in (("frozen dense", dense), ("dense training", training),
                        ("mask learning", learn)):
        print(f"{name:<16} {value:9.3f} {value / dense:9.2f}")
    print(f"mask learning: {result['ratio_vs_frozen']:.2f}x frozen dense (goal <= 1.25x; the "
          f"weight-gradient GEMM alone costs {result['gemm_floor_vs_frozen']:.2f}x), "
          f"{result['ratio_vs_dense_training']:.2f}x dense training")
    print(f"state {result['state_bytes_per_prunable_weight']:.1f} bytes per prunable weight "
          "(goal <= 13; the original needs about 27)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
