"""The sparse-weight regulariser's sign: ``loss = LM - lambda(t) * sum ||W * M~||^2`` (MaskLLM).

Minimising the loss must make the masks keep large weights: one optimiser step on the
regulariser alone raises ``sum ||W * M~||^2`` (and the old ``+lambda`` sign lowers it, which
shows the comparison can fail)."""

import math

import pytest
import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.errors import InputError
from maskllm_megatron.sampling import NoiseKey, sample_masked_weight
from maskllm_megatron.training import step
from maskllm_megatron.training.args import TrainArgs

PATTERN = NMPattern(2, 4)
SAMPLE = dict(tau=2.0, kappa=50.0, key=NoiseKey(seed=3, layer=0, iteration=7, microbatch=1))


def reg_before_and_after_one_step(reg_weight=1e-5):
    """A tiny sparse layer (frozen W, mask logits) and one AdamW step on the trainer's loss with
    the LM loss switched off; ``sum ||W * M~||^2`` before and after, drawn with the same key."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    logits = torch.nn.Parameter(0.05 * torch.randn(16, 8, PATTERN.num_candidates, generator=gen))
    optimizer = torch.optim.AdamW([logits], lr=1e-2, weight_decay=0.0)
    out, reg = sample_masked_weight(weight, logits, PATTERN, **SAMPLE)
    lm_off = 0.0 * out.sum()  # no LM gradient: only the regulariser moves the logits
    step.add_regularizer(lm_off, reg, reg_weight, num_microbatches=1).backward()
    assert logits.grad.abs().max() > 0
    optimizer.step()
    with torch.no_grad():
        _, after = sample_masked_weight(weight, logits, PATTERN, **SAMPLE)
    return float(reg.detach()), float(after)


def test_one_step_on_the_regulariser_alone_keeps_larger_weights():
    before, after = reg_before_and_after_one_step()
    assert after > before * (1 + 1e-3), (before, after)


def test_the_old_sign_would_fail_the_step_test(monkeypatch):
    """With ``+lambda`` (the sign this trainer used to apply) the same step lowers the norm, so
    the test above can tell the signs apart."""
    monkeypatch.setattr(step, "REGULARIZER_SIGN", +1.0)
    before, after = reg_before_and_after_one_step()
    assert after < before * (1 - 1e-3), (before, after)


def test_add_regularizer_sends_minus_lambda_into_the_term():
    output = torch.ones(3, requires_grad=True)
    reg = torch.tensor(2.0, requires_grad=True)
    step.add_regularizer(output, reg, 0.3, num_microbatches=4).sum().backward()
    assert float(reg.grad) == pytest.approx(-0.3 / 4) and torch.equal(output.grad, torch.ones(3))
    reg.grad = None
    assert step.add_regularizer(output, reg, 0.0, num_microbatches=4) is output  # off at 0
    # fp16: megatron's loss scale multiplies the term's gradient as it does the LM loss's
    config = type("Config", (), {"grad_scale_func": staticmethod(lambda loss: loss * 1024.0)})
    step.add_regularizer(output, reg, 0.3, 4, config).sum().backward()
    assert float(reg.grad) == pytest.approx(-0.3 / 4 * 1024.0) and reg.grad.shape == ()


def test_lambda_decays_linearly_to_zero():
    assert step.regularizer_weight(1e-5, 0, 100) == 1e-5
    assert step.regularizer_weight(1e-5, 50, 100) == pytest.approx(5e-6)
    assert 0 < step.regularizer_weight(1e-5, 99, 100) < 2e-7


@pytest.mark.parametrize("value", [-1e-5, math.nan])
def test_a_negative_weight_reg_is_an_input_error(value):
    with pytest.raises(InputError, match="--weight-reg must be >= 0"):
        TrainArgs(weight_reg=value).validate()
    TrainArgs(weight_reg=0.0).validate()  # 0 turns the term off
