"""lm-evaluation-harness is an optional extra: without it ``eval-tasks`` is one clear error
naming the extra, and the rest of the package does not import it."""

import sys

import pytest

from maskllm_megatron.errors import InputError


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    from maskllm_megatron.eval import tasks

    for name in tasks.OFFLINE:  # what it sets, restored afterwards
        monkeypatch.setenv(name, "1")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(InputError, match=r'pip install "maskllm_megatron\[eval\]"'):
        tasks.require_lm_eval()


def test_task_names_are_parsed_in_order_without_repeats():
    from maskllm_megatron.eval.tasks import PAPER_TASKS, parse_tasks

    assert parse_tasks("piqa, hellaswag,piqa,") == ["piqa", "hellaswag"]
    assert len(PAPER_TASKS) == 7
    with pytest.raises(InputError, match="names no task"):
        parse_tasks(" , ")
