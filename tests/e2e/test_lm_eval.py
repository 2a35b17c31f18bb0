"""``maskllm eval-tasks``: our lm-eval adapter on a converted tiny LLaMA gives what lm-eval's own
``hf`` model gives on the same weights (float32): the same acc and acc_norm on a shipped
multiple-choice task, per-item log-likelihoods equal within 1e-4, the same rolling
log-likelihoods and greedy generations; at TP=1 in this process, at TP=2 x DP=2 and
TP=2 x PP=2 (sequence-parallel) on the session's four gloo ranks; on a pruned checkpoint
through the CLI. The CLI runs in this process (no start-up cost), as in test_ppl_protocols.
Skipped only when lm_eval (the [eval] extra) is not installed.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from maskllm_megatron.cli import main  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "lmeval_tasks"
WORDS = "the cat sat on a mat dog ran far away and then slept under old tree".split()
TOL = 1e-4
ROLLING = ["the cat sat on the mat and then the dog ran far away under the old tree " * 3,
           "old tree"]


def _tokenizer(directory: Path) -> None:
    """A byte-level BPE that adds BOS, as LLaMA's tokenizers do (vocab within the model's 300)."""
    import random

    import tokenizers
    import transformers as tf
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               pad_token="</s>").save_pretrained(directory)


def task_dir(root: Path) -> Path:
    """The shipped task, its YAML naming the JSONL by absolute path."""
    out = root / "tasks"
    out.mkdir(exist_ok=True)
    text = (DATA / "tiny_mc.yaml").read_text()
    (out / "tiny_mc.yaml").write_text(
        text.replace("validation: tiny_mc.jsonl", f"validation: {DATA / 'tiny_mc.jsonl'}"))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF LLaMA with its tokenizer, converted; the task; lm-eval's ``hf`` results."""
    from test_convert import hf_model

    root = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)  # the same tiny model whichever test builds it first
    hf_model("llama").save_pretrained(root / "hf")
    _tokenizer(root / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "m"),
                 "--no-progress"]) == 0
    tasks = task_dir(root)
    return root, tasks, reference(root, tasks)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def requests():
    """Direct requests beyond the task: an empty context (BOS conditions it), a trailing space
    (moved to the continuation), rolling texts longer than a window, a greedy generation."""
    ll = [("", " the cat sat"), ("the dog ", "ran far"), ("Question: what is old\nAnswer:",
                                                          " the tree")]
    gen = [("the cat sat on", {"until": ["\n"], "max_gen_toks": 6})]
    return (_instances("loglikelihood", ll), _instances("loglikelihood_rolling",
                                                         [(t,) for t in ROLLING]),
            _instances("generate_until", gen))


def answers(lm, tasks: Path) -> dict:
    """What a test compares: the task's metrics and per-item log-likelihoods, and the direct
    requests' answers."""
    from maskllm_megatron.eval.tasks import run_tasks

    results = run_tasks(lm, ["tiny_mc"], include_path=tasks, log_samples=True)
    task = results["results"]["tiny_mc"]
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    ll, rolling, gen = requests()
    lm._max_length, saved = 24, lm.max_length  # rolling windows of 24 tokens: several per text
    try:
        rolled = lm.loglikelihood_rolling(rolling)
    finally:
        lm._max_length = saved
    return {"acc": task["acc,none"], "acc_norm": task["acc_norm,none"],
            "items": [[r[0][0] for r in s["resps"]] for s in samples],
            "greedy": [[r[0][1] for r in s["resps"]] for s in samples],
            "ll": lm.loglikelihood(ll), "rolling": rolled, "gen": lm.generate_until(gen)}


def reference(root: Path, tasks: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(root / "hf"), device="cpu", dtype="float32", batch_size=4)
    return answers(lm, tasks)


def ours(root: Path, tasks: Path, batch_size: int = 4, sequence_parallel: bool = False) -> dict:
    """Our adapter on the converted checkpoint, in the running process group."""
    from maskllm_megatron import distributed
    from maskllm_megatron.checkpoint.model import load_sparse_model
    from maskllm_megatron.core.nm import NMPattern
    from maskllm_megatron.eval.lm_eval_adapter import MegatronLM, load_lm_tokenizer
    from maskllm_megatron.model.config import ModelConfig

    cfg = ModelConfig.load(root / "m")
    model, _, _ = load_sparse_model(root / "m", cfg, NMPattern(2, 4), params_dtype=torch.float32,
                                    sequence_parallel=sequence_parallel)
    lm = MegatronLM(model, load_lm_tokenizer(cfg.tokenizer), cfg.max_sequence_length,
                    batch_size=batch_size, true_vocab_size=cfg.true_vocab_size)
    out = answers(lm, tasks)
    out["layout"] = distributed.current_layout()
    return out


def _agree(got: dict, want: dict) -> None:
    assert got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"]
    assert len(got["items"]) == len(want["items"]) == 12
    for g, w in zip(got["items"], want["items"], strict=True):
        assert g == pytest.approx(w, abs=TOL)
    assert got["greedy"] == want["greedy"]
    assert [x[0] for x in got["ll"]] == pytest.approx([x[0] for x in want["ll"]], abs=TOL)
    assert [x[1] for x in got["ll"]] == [x[1] for x in want["ll"]]
    assert got["rolling"] == pytest.approx(want["rolling"], abs=TOL)
    assert got["gen"] == want["gen"]


def test_tp1_equals_lm_evals_hf_model(setup):
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    root, tasks, want = setup
    try:
        with cpu_shims():
            distributed.init_distributed(1, 1, device="cpu")
            got = ours(root, tasks, batch_size=3)  # another batching than the reference's
    finally:
        distributed.shutdown()
    _agree(got, want)


def case_ours(root, tasks, sequence_parallel):
    return ours(root, tasks, sequence_parallel=sequence_parallel)


def test_tp2_dp2_and_tp2_pp2_equal_lm_evals_hf_model(setup, dist4):
    """TP=2 x PP=2 with sequence parallelism (inputs padded to a multiple of TP)."""
    root, tasks, want = setup
    for tp, pp in ((2, 1), (2, 2)):
        values = dist4.run(case_ours, root, tasks, pp == 2, tp=tp, pp=pp)
        assert {v["layout"].dp for v in values} == {4 // (tp * pp)}
        for got in values:  # every rank returns the same results
            _agree(got, want)


def test_cli_on_a_pruned_checkpoint_equals_hf_on_its_export(setup, tmp_path, capsys):
    """The 2:4 masks apply: ``eval-tasks`` on a magnitude-pruned checkpoint gives what lm-eval's
    ``hf`` model gives on its Hugging Face export (the masked weights), per item too; the JSON
    is lm-eval's."""
    from lm_eval.models.huggingface import HFLM

    root, tasks, dense = setup
    assert main(["prune", "--method", "magnitude", "--load", str(root / "m"), "--save",
                 str(tmp_path / "p"), "--no-progress"]) == 0
    assert main(["export", "hf", "--load", str(tmp_path / "p" / "pruned"), "--out",
                 str(tmp_path / "hf"), "--no-progress"]) == 0
    want = answers(HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32",
                        batch_size=4), tasks)
    capsys.readouterr()
    out = tmp_path / "res" / "tiny.json"
    assert main(["eval-tasks", "--load", str(tmp_path / "p" / "pruned"), "--tasks", "tiny_mc",
                 "--include-path", str(tasks), "--output", str(out), "--log-samples",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    got = results["results"]["tiny_mc"]
    assert got["acc,none"] == want["acc"] and got["acc_norm,none"] == want["acc_norm"]
    items = [[r[0][0] for r in s["resps"]]
             for s in sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    for g, w, d in zip(items, want["items"], dense["items"], strict=True):
        assert g == pytest.approx(w, abs=TOL)
        assert g != pytest.approx(d, abs=1e-3)  # the masks matter
    assert results["n-shot"] == {"tiny_mc": 0} and results["versions"] == {"tiny_mc": 1.0}
    assert results["config"]["masks"] == "fixed" and results["config"]["pattern"] == "2:4"
    assert "|tiny_mc|" in printed.replace(" ", "") and "acc_norm" in printed


def test_missing_task_data_and_unknown_task_are_one_line_errors(setup, tmp_path, capsys,
                                                                monkeypatch):
    from lm_eval.tasks import TaskManager

    from maskllm_megatron.eval import tasks as eval_tasks

    root, tasks, _ = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny_mc.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace(
        str(DATA / "tiny_mc.jsonl"), str(tmp_path / "absent.jsonl")))
    # an unknown name falls back to lm-eval's whole task index (a minute on 2 cores): not here
    monkeypatch.setattr(eval_tasks, "_managers", lambda names, include: iter(
        [(TaskManager(include_path=str(include), include_defaults=False), True)]))
    for tasks_arg, include, said in (("tiny_mc", broken, "task 'tiny_mc': its data is not "
                                      "available offline"),
                                     ("no_such_task", tasks, "task 'no_such_task' is not one")):
        code = main(["eval-tasks", "--load", str(root / "m"), "--tasks", tasks_arg,
                     "--include-path", str(include), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_a_sentencepiece_tokenizer_adds_one_bos_and_decodes_as_hugging_face(tmp_path):
    """A checkpoint trained here carries a SentencePiece model: BOS first (once, also when the
    text starts with it), special tokens decoded as Hugging Face decodes them."""
    import sentencepiece as spm

    from maskllm_megatron.eval.lm_eval_adapter import MegatronLM, load_lm_tokenizer

    (tmp_path / "t.txt").write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(16)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "s"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    tok = load_lm_tokenizer(tmp_path / "s.model")
    lm = MegatronLM.__new__(MegatronLM)  # tokenising needs no model
    lm.tokenizer, lm.add_bos_token = tok, None
    ids = lm.tok_encode("the cat sat")
    assert ids[0] == lm.prefix_token_id == 1 and ids.count(1) == 1
    assert lm.tok_encode("<s>the cat sat") == tok.sp.encode("<s>the cat sat")  # no second BOS
    assert tok.decode(ids) == "<s>the cat sat" and lm.tok_decode(ids) == "the cat sat"
    assert tok.decode(2) == "</s>" and lm.eot_token_id == 2
