"""Distillation settings and the KL term on one process (the vocab-parallel cases at TP=2 and
PP=2 are in tests/dist/test_distill_dist.py)."""

import pytest
import torch
import torch.nn.functional as F

from maskllm_megatron.errors import InputError
from maskllm_megatron.training.distill import Distillation, distillation, vocab_parallel_kl_div


def _reference_kl(student, teacher, temperature):
    log_q = F.log_softmax(student.double() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.double() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_and_its_gradient_equal_a_float64_reference(temperature):
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    student = (3 * torch.randn(3, 5, 40, generator=gen)).requires_grad_()
    teacher = 3 * torch.randn(3, 5, 40, generator=gen)
    probe = torch.randn(3, 5, generator=gen)
    kl = vocab_parallel_kl_div(student, teacher, temperature)
    assert kl.dtype == torch.float32 and kl.shape == (3, 5)
    (kl * probe).sum().backward()
    ref_student = student.detach().double().requires_grad_()
    ref = _reference_kl(ref_student, teacher, temperature)
    (ref * probe.double()).sum().backward()
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-5, atol=1e-6)
    # Hinton's scaling: the gradient is T * (softmax(s/T) - softmax(t/T)), per unit probe
    want = temperature * (F.softmax(ref_student.detach() / temperature, -1)
                          - F.softmax(teacher.double() / temperature, -1))
    torch.testing.assert_close(student.grad.double(), want * probe.double().unsqueeze(-1),
                               rtol=1e-5, atol=1e-6)


def test_kl_gradcheck_in_float64_and_zero_for_equal_logits():
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    student = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: vocab_parallel_kl_div(s, teacher, 1.7), (student,))
    same = vocab_parallel_kl_div(teacher, teacher.clone(), 3.0)
    assert same.dtype == torch.float64 and same.abs().max() < 1e-12


def test_teacher_gets_no_gradient():
    teacher = torch.randn(2, 9, requires_grad=True)
    student = torch.randn(2, 9, requires_grad=True)
    vocab_parallel_kl_div(student, teacher).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_settings_weight_zero_is_off():
    assert distillation(0.0, 2.0) is None
    assert distillation(0.5, 2.0) == Distillation(0.5, 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Distillation(1.5)
    with pytest.raises(ValueError, match="positive"):
        Distillation(0.5, 0.0)


def test_flags_recipe_keys_and_validation(tmp_path):
    from maskllm_megatron.cli import parse_args
    from maskllm_megatron.cli.train import train_args_from

    args = train_args_from(parse_args(["train", "--kd-weight", "0.25", "--kd-temperature", "2"]))
    assert (args.kd_weight, args.kd_temperature) == (0.25, 2.0)
    default = train_args_from(parse_args(["train"]))
    assert (default.kd_weight, default.kd_temperature) == (0.0, 1.0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("kd-weight: 0.5\nkd_temperature: 4\n")
    args = train_args_from(parse_args(["train", "--config", str(recipe), "--kd-weight", "0.1"]))
    assert (args.kd_weight, args.kd_temperature) == (0.1, 4.0)  # the command line wins
    for flags, message in ((["--kd-weight", "1.5"], "--kd-weight must be in"),
                           (["--kd-weight", "-0.1"], "--kd-weight must be in"),
                           (["--kd-temperature", "0"], "--kd-temperature must be a positive"),
                           (["--kd-weight", "0.5", "--dense", "--train-weights"], "--dense")):
        with pytest.raises(InputError, match=message):
            train_args_from(parse_args(["train", *flags]))


def test_plan_counts_the_doubled_micro_batch():
    from maskllm_megatron.model.config import ModelConfig, TransformerFields
    from maskllm_megatron.training.plan import plan_layout

    cfg = ModelConfig(TransformerFields(num_layers=4, hidden_size=256, num_attention_heads=4,
                                        ffn_hidden_size=1024), vocab_size=4096,
                      max_sequence_length=256)
    plain = plan_layout(cfg, 1, 1, 8, 256, 2, 16, 80)
    kd = plan_layout(cfg, 1, 1, 8, 256, 2, 16, 80, kd=True)
    logits = 4 * 256 * 2 * 4096  # fp32 [s, b, V]
    # layers at twice the micro-batch, four logits-sized tensors instead of one
    assert kd.rows["activations"] - 2 * plain.rows["activations"] == pytest.approx(2 * logits)
    assert {k: v for k, v in kd.rows.items() if k != "activations"} == \
        {k: v for k, v in plain.rows.items() if k != "activations"}
