"""The benchmarks keep running: their model shapes, and `throughput.py` end to end on stories260K.

Benchmarks measure and are not run in CI for their numbers; these checks only keep them from rotting
(they import `sdpo` internals that move). TRL (`--trl`) is an extra CI does not install, so it is left out.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import STORIES, ULTRAFEEDBACK

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def reference_pass():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import reference_pass

        yield reference_pass
    finally:
        sys.path.remove(str(BENCHMARKS))


def _args(reference_pass, *extra):
    return reference_pass.parse_args(["--model", str(STORIES), "--data", str(ULTRAFEEDBACK), "--pairs", "2", *extra])


@pytest.mark.timeout(120)
def test_synthetic_shapes(reference_pass):
    tok = reference_pass.load_tokenizer(STORIES)
    cpu = torch.device("cpu")

    def build(*extra):
        return reference_pass.build_model(_args(reference_pass, *extra), tok, torch.float32, cpu)

    small = build("--synthetic-llama", "25m")
    assert small.config.vocab_size == len(tok) == 512  # the tokenizer's, unless --vocab says otherwise
    assert small.config.num_key_value_heads == small.config.num_attention_heads
    wide = build("--synthetic-llama", "25m", "--vocab", "32000")
    assert wide.get_output_embeddings().weight.shape == (32000, 512)
    # only the embeddings and the lm_head grow: (32000 - 512) rows of 512, twice (untied)
    grown = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in small.parameters())
    assert grown == 2 * (32000 - 512) * 512
    smol = build("--synthetic-llama", "smollm2-135m")  # SmolLM2-135M's published shape
    assert (smol.config.vocab_size, smol.config.num_key_value_heads, smol.config.tie_word_embeddings) == (49152, 3, True)
    assert smol.get_output_embeddings().weight is smol.get_input_embeddings().weight
    assert round(sum(p.numel() for p in smol.parameters()) / 1e6, 1) == 134.5
    with pytest.raises(SystemExit, match="--vocab 100 is below the tokenizer's 512"):
        build("--synthetic-llama", "25m", "--vocab", "100")


@pytest.mark.timeout(300)
def test_throughput_runs_every_layout_to_the_same_first_loss():
    cmd = [sys.executable, str(BENCHMARKS / "throughput.py"), "--model", str(STORIES), "--data", str(ULTRAFEEDBACK),
           "--pairs", "8", "--batch", "4", "--precision", "fp32", "--layouts", "plain,shared,prefix", "--online",
           "--threads", "1", "--rounds", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"(reference pass|train online), (plain|shared|prefix)\s+fp32\s+([\d.]+)\s", line)
        if m:
            rows[(m[1], m[2])] = line.split()
    assert set(rows) == {("reference pass", "plain"), ("reference pass", "shared"), ("reference pass", "prefix"),
                         ("train online", "plain"),
                         ("train online", "shared"), ("train online", "prefix")}, out.stdout
    assert all(float(cols[4]) > 0 for cols in rows.values())  # pairs/s
    # the last column: the first batch's loss, the same in every layout (the layouts are exact in fp32)
    firsts = [float(cols[-1]) for key, cols in rows.items() if key[0] == "train online"]
    assert max(firsts) - min(firsts) < 1e-4, firsts
    assert "stories260K (vocab 512)" in out.stdout
    assert "2 rounds, ours and TRL's in turn: each row's median" in out.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", [[], ["--no-online", "--layout", "shared"]])
def test_head_backward_times_both_paths_to_identical_losses(extra):
    """The A/B of the lm_head's backward: both variants run every repetition and give the same losses
    (it exits 1 if they differ)."""
    cmd = [sys.executable, str(BENCHMARKS / "head_backward.py"), "--model", str(STORIES), "--data", str(ULTRAFEEDBACK),
           "--pairs", "8", "--batch", "4", "--threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"autograd +[\d.]+, [\d.]+ s", out.stdout) and re.search(r"fused +[\d.]+, [\d.]+ s", out.stdout)
    assert "losses of every step identical: True" in out.stdout


def test_rounds_merge_to_their_median_and_keep_every_round(reference_pass):
    import throughput  # benchmarks/ is on the path while the fixture is

    rounds = [dict(what="train online, prefix", seconds=s, mb=m, first=1.5) for s, m in ((9.0, 10), (7.0, 30), (8.0, 20))]
    row = throughput.merge_rounds(rounds)
    assert (row["seconds"], row["mb"], row["rounds"], row["first"]) == (8.0, 30, [9.0, 7.0, 8.0], 1.5)
    assert throughput.merge_rounds(rounds[:2])["seconds"] == 8.0  # an even count: the middle two's mean
