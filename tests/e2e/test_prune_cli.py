"""`maskllm prune` and `maskllm eval-ppl` end to end on a small trained model (subprocesses)."""

import random
import re

import pytest
from cli_runner import run_cli as _run


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 2-layer GPT trained densely on the corpus (masks off), and held-out text."""
    root = tmp_path_factory.mktemp("trained")
    _run(["train", "--model-config", str(corpus / "model"), "--data-path",
          str(corpus / "data" / "docs"), "--split", "90,10,0", "--micro-batch-size", "8",
          "--global-batch-size", "8", "--seq-length", "32", "--train-iters", "100",
          "--save", str(root / "dense"), "--train-weights", "--dense", "--lr", "3e-3",
          "--min-lr", "3e-4", "--seed", "1", "--no-progress"])
    rng = random.Random(7)
    words = "the cat sat on a mat dog ran far away and then slept under old tree".split()
    (root / "heldout.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(60))
                                                for _ in range(30)))
    return root


def _prune(corpus, trained, method, save, *extra):
    return _run(["prune", "--method", method, "--load", str(trained / "dense"),
                 "--model-config", str(corpus / "model"), "--data-path",
                 str(corpus / "data" / "docs"), "--seq-length", "32", "--save", str(save),
                 "--no-progress", *extra], check=False)


def _loss(corpus, trained, path) -> float:
    out = _run(["eval-ppl", "--load", str(path), "--model-config", str(corpus / "model"),
                "--text", str(trained / "heldout.txt"), "--no-progress"]).stdout
    return float(out.strip().splitlines()[-1].split()[-2])


def test_one_shot_baselines_order_and_feed_training(corpus, trained, tmp_path):
    losses = {"dense": _loss(corpus, trained, trained / "dense")}
    for name, method, extra in (("magnitude", "magnitude", ()), ("wanda", "wanda", ()),
                                ("sparsegpt+update", "sparsegpt", ("--update-weights",))):
        proc = _prune(corpus, trained, method, tmp_path / name, "--calib-samples", "16", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(re.findall(r" 50\.0%", proc.stdout)) == 8  # every layer is 2:4
        losses[name] = _loss(corpus, trained, tmp_path / name / "pruned")
    print(losses)
    # robust on this model: pruning costs something, and SparseGPT's update recovers more
    # than either score-only method. Wanda vs magnitude is too close here to assert.
    assert all(losses[k] > losses["dense"] for k in losses if k != "dense")
    assert losses["sparsegpt+update"] < min(losses["magnitude"], losses["wanda"])

    # the masks checkpoint is a prior for mask learning
    run = tmp_path / "learn"
    _run(["train", "--model-config", str(corpus / "model"), "--data-path",
          str(corpus / "data" / "docs"), "--split", "90,10,0", "--micro-batch-size", "2",
          "--global-batch-size", "2", "--seq-length", "32", "--train-iters", "1", "--lr", "1e-9",
          "--load", str(trained / "dense"), "--prior", str(tmp_path / "wanda" / "masks"),
          "--save", str(run), "--no-progress"])
    from run_files import plain_tensors

    learned = plain_tensors(run / "iter_0000001" / "model")
    prior = plain_tensors(tmp_path / "wanda" / "masks")
    for key, indices in prior.items():
        logits = learned[key.replace("mask_indices", "mask_logits")]
        agree = (logits.argmax(-1) == indices.long()).float().mean()
        assert agree > 0.9, f"{key}: only {agree:.0%} of groups start at the prior"
    out = _run(["eval-ppl", "--load", str(run), "--model-config", str(corpus / "model"),
                "--text", str(trained / "heldout.txt"), "--no-progress"]).stdout
    assert out.strip().splitlines()[-1].split()[1] == "hard"  # argmax of the learned logits


def test_bad_prune_input_is_a_clear_error(corpus, trained, tmp_path):
    proc = _prune(corpus, trained, "obs", tmp_path / "x")
    assert proc.returncode == 1 and "magnitude, wanda, sparsegpt" in proc.stderr
    proc = _prune(corpus, trained, "wanda", tmp_path / "y", "--calib-samples", "100000")
    assert proc.returncode == 1
    counts = re.search(r"= (\d+) tokens, but .* holds (\d+)", proc.stderr)
    assert counts and int(counts[1]) == 100000 * 33 and int(counts[2]) < int(counts[1])
    assert not (tmp_path / "y").exists()  # nothing written
