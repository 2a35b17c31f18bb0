"""AdamW for mask logits with narrow state: 15 bytes per prunable weight instead of 24.

Plain fp32 AdamW on 2:4 logits costs 1.5 logits per weight x (logit + gradient + two moments)
x 4 bytes = 24 bytes per prunable weight (the original, with a bf16 copy, about 27). This
optimizer keeps the logits in fp32 (updates are tiny next to their values, and kappa up to 500
magnifies any rounding) and stores the rest narrow, in megatron's precision-aware-optimizer terms:

* gradients accumulate over micro-batches into a ``main_grad`` buffer (megatron's idiom), bf16 by
  default like megatron's bf16 gradient buffers (``--main-grads-dtype fp32`` for exact sums);
* ``--exp-avg-dtype`` / ``--exp-avg-sq-dtype``: the moments, bf16 by default;
* ``--second-moment group`` keeps one second moment per N:M group (mean of its C squared
  gradients, Adam-mini's idea) instead of per logit: 13 bytes per weight with an fp32 moment.

All arithmetic is fp32; only storage is narrow. ``bench/bench_optimizer_state.py`` measures what
each format learns on a planted-mask problem: all-bf16 (1.5 x (4 + 2 + 2 + 2) = 15 bytes) finds
the planted masks as well as fp32 AdamW; per-group second moments find fewer (a group's small
logits then move less than Adam would move them), and an fp16 second moment underflows. Any
other parameter (``--train-weights``) gets plain AdamW in its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# elements processed at once in step(): bounds the fp32 temporaries of a huge layer
_CHUNK = 1 << 22


@dataclass(frozen=True)
class StateFormat:
    """How one parameter's gradient and Adam moments are stored (None: the parameter's dtype)."""

    main_grad_dtype: torch.dtype | None = None
    exp_avg_dtype: torch.dtype | None = None
    exp_avg_sq_dtype: torch.dtype | None = None
    per_group_second_moment: bool = False  # one exp_avg_sq per last-axis row (an N:M group)

    def exp_avg_sq_shape(self, param: torch.Tensor) -> torch.Size:
        if self.per_group_second_moment:
            return param.shape[:-1] + (1,)
        return param.shape



FULL = StateFormat()  # plain AdamW


class MaskAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) over ``main_grad`` buffers.

    Each param group carries a ``format`` (:class:`StateFormat`). Gradients from autograd are
    moved into ``param.main_grad`` by a post-accumulate hook, so ``param.grad`` is never kept.
    State is allocated up front, so memory is known at start and checkpoints always have it.
    """

    def __init__(self, param_groups, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        format=FULL)
        super().__init__(param_groups, defaults)
        self._hooks = []
        for group in self.param_groups:
            fmt = group["format"]
            for param in group["params"]:
                param.main_grad = torch.zeros_like(param, dtype=fmt.main_grad_dtype)
                self._hooks.append(param.register_post_accumulate_grad_hook(_into_main_grad))
                self.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, dtype=fmt.exp_avg_dtype),
                    "exp_avg_sq": torch.zeros(fmt.exp_avg_sq_shape(param),
                                              dtype=fmt.exp_avg_sq_dtype or param.dtype),
                }

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - buffers persist
        for param in self.params():
            param.grad = None
            param.main_grad.zero_()

    def state_bytes(self) -> dict[str, int]:
        """Bytes held per kind: params, main_grad, exp_avg, exp_avg_sq."""
        total = {"param": 0, "main_grad": 0, "exp_avg": 0, "exp_avg_sq": 0}
        for param in self.params():
            slot = self.state[param]
            total["param"] += param.numel() * param.element_size()
            total["main_grad"] += param.main_grad.numel() * param.main_grad.element_size()
            for name in ("exp_avg", "exp_avg_sq"):
                total[name] += slot[name].numel() * slot[name].element_size()
        return total

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - megatron-style: no closures
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            fmt = group["format"]
            for param in group["params"]:
                slot = self.state[param]
                slot["step"] += 1
                steps = float(slot["step"])
                scale = group["lr"] / (1 - beta1 ** steps)
                root = (1 - beta2 ** steps) ** 0.5
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                width = param.shape[-1] if fmt.per_group_second_moment else 1
                rows = max(1, _CHUNK // width)
                views = [x.reshape(-1, width) for x in
                         (param.data, param.main_grad, slot["exp_avg"])]
                sq = slot["exp_avg_sq"].reshape(-1, 1)
                for start in range(0, views[0].shape[0], rows):
                    p, g, m = (v[start:start + rows] for v in views)
                    v = sq[start:start + rows]
                    wide = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64
                    g32 = g.to(wide)
                    m32 = m.to(wide).mul_(beta1).add_(g32, alpha=1 - beta1)
                    g2 = g32.square()  # not in place: g32 may be main_grad itself
                    if width > 1:
                        g2 = g2.mean(-1, keepdim=True)
                    v32 = v.to(wide).mul_(beta2).add_(g2, alpha=1 - beta2)
                    denom = v32.sqrt().div_(root).add_(group["eps"])
                    p.addcdiv_(m32, denom, value=-scale)
                    m.copy_(m32)
                    v.copy_(v32)


def _into_main_grad(param: torch.Tensor) -> None:
    # None when the sparse layers' sampler already added this gradient into main_grad
    # (gradient-accumulation fusion): autograd still runs the parameter's accumulator
    if param.grad is not None:
        param.main_grad.add_(param.grad)
    param.grad = None


def mask_state_format(main_grads_dtype: str = "bf16", exp_avg_dtype: str = "bf16",
                      exp_avg_sq_dtype: str = "bf16", second_moment: str = "element"
                      ) -> StateFormat:
    """The format for mask logits from the trainer's flags."""
    for name, value in (("--main-grads-dtype", main_grads_dtype),
                        ("--exp-avg-dtype", exp_avg_dtype),
                        ("--exp-avg-sq-dtype", exp_avg_sq_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, not {value!r}")
    if second_moment not in ("group", "element"):
        raise ValueError(f"--second-moment must be group or element, not {second_moment!r}")
    return StateFormat(DTYPES[main_grads_dtype], DTYPES[exp_avg_dtype], DTYPES[exp_avg_sq_dtype],
                       second_moment == "group")
