import math

import pytest

from maskllm_megatron.core.schedules import GumbelSchedule, anneal


def test_linear_and_cosine_endpoints_and_midpoints():
    assert anneal(4.0, 0.05, 0, 100) == 4.0
    assert anneal(4.0, 0.05, 100, 100) == pytest.approx(0.05)
    assert anneal(4.0, 0.05, 50, 100) == pytest.approx((4.0 + 0.05) / 2)
    assert anneal(100, 500, 25, 100, "cosine") == pytest.approx(
        100 + 400 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert anneal(100, 500, 50, 100, "cosine") == pytest.approx(300)


def test_clamped_outside_training_and_monotonic():
    assert anneal(1.0, 2.0, -5, 10) == 1.0
    assert anneal(1.0, 2.0, 50, 10) == 2.0
    for kind in ("linear", "cosine"):
        values = [anneal(4.0, 0.05, t, 40, kind) for t in range(41)]
        assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_default_schedule_follows_the_original_recipe():
    s = GumbelSchedule(total_iters=2000)
    assert (s.tau(0), s.kappa(0)) == (4.0, 100.0)
    assert s.tau(2000) == pytest.approx(0.05) and s.kappa(2000) == pytest.approx(500.0)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="exponential"):
        anneal(1, 2, 0, 10, "exponential")
    with pytest.raises(ValueError, match="positive"):
        GumbelSchedule(tau_range=(4.0, 0.0))
