"""The inference pass's scorer on the real stories260K model and real pairs, without Ray.

The central claim: `reference.mode: precompute` (log-probs from the scoring pass, which batches,
sorts and pads pairs its own way) gives the same loss and gradients as `online` (the reference run
inside the training step on the training batch).

Tolerance: both are fp32 forward passes of the same sequences; only the padding and batch
composition differ, so the logits differ by matmul summation order alone (~1e-7 relative). A
sequence log-prob sums at most ~100 token log-probs, so |delta log p| stays below ~1e-4, and the DPO
loss moves by at most beta/4 * |delta rho| ~ 1e-5. We assert 2e-5 on losses and 1e-4 relative on
gradients; a wrong token, mask or aggregation moves them by orders of magnitude more.
"""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo.logprobs import collate_pairs, sequence_logps, split_pairs
from sdpo.rows import prepare_record
from sdpo.scoring import PairScorer, score_pairs
from sdpo.training import LossSettings, freeze, pair_losses, precomputed_reference

from .conftest import ORCA, STORIES, ULTRAFEEDBACK

DPO = LossSettings("sigmoid", 0.1, {})
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pairs(shared):
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    out = []
    for path in (ORCA, ULTRAFEEDBACK):
        for line in path.read_text().splitlines()[:6]:
            p = prepare_record(json.loads(line), tok, max_length=96, max_prompt_length=48, eos_id=tok.eos_token_id)
            out.append((p.prompt_ids, p.chosen_ids, p.rejected_ids))
    return [list(x) for x in zip(*out, strict=True)]  # prompts, chosen, rejected


@pytest.fixture(scope="module")
def models(shared):
    torch.manual_seed(0)
    reference = freeze(AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32))
    policy = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    with torch.no_grad():  # a policy that differs from its reference, as after some training
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, reference


def with_reference(batch, scores):
    return batch | {
        "ref_chosen_logps": torch.tensor(scores["chosen_logps"]),
        "ref_rejected_logps": torch.tensor(scores["rejected_logps"]),
        "chosen_tokens": torch.tensor(scores["chosen_tokens"]),
        "rejected_tokens": torch.tensor(scores["rejected_tokens"]),
    }


def test_precompute_equals_online_loss_and_gradients(pairs, models):
    policy, reference = models
    # the pass sorts by length and uses micro-batches of 5: a different padding than the training batch
    scores = score_pairs(reference, *pairs, device=CPU, micro_batch=5)
    batch = collate_pairs(*pairs)

    policy.zero_grad()
    online, m_online = pair_losses(policy, reference, batch, DPO)
    online.sum().backward()
    g_online = {n: p.grad.clone() for n, p in policy.named_parameters()}

    policy.zero_grad()
    pre, m_pre = pair_losses(policy, None, with_reference(batch, scores), DPO)
    pre.sum().backward()

    assert online.shape == pre.shape == (len(pairs[0]),)
    assert torch.allclose(online, pre, rtol=0, atol=2e-5), (online - pre).abs().max()
    assert float(online.detach().mean()) != pytest.approx(math.log(2), abs=1e-3), "policy == reference: the test proves nothing"
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert torch.allclose(m_online[key], m_pre[key], atol=1e-5), key
    # The pass scores in the shared-prompt layout (fp32 model): its log-probs equal the online ones up to
    # float32 rounding (~1e-5 on a summed log-prob), which moves gradient entries by up to ~1e-6 beyond rtol (measured 8e-7; entries reach ~26).
    for n, p in policy.named_parameters():
        assert torch.allclose(g_online[n], p.grad, rtol=1e-4, atol=5e-6), n


def test_precomputed_mean_aggregation_matches_the_model(pairs, models):
    """sum / token count from the pass equals the per-token average of an online forward (IPO's aggregation)."""
    _, reference = models
    scores = score_pairs(reference, *pairs, device=CPU, micro_batch=4)
    batch = collate_pairs(*pairs)
    with torch.no_grad():
        online = split_pairs(sequence_logps(reference, batch, average=True))
    pre = precomputed_reference(with_reference(batch, scores), average=True)
    for a, b in zip(online, pre, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert list(scores["chosen_tokens"]) == [len(c) for c in pairs[1]]
    assert list(scores["rejected_tokens"]) == [len(r) for r in pairs[2]]


def test_scores_come_back_in_input_order_whatever_the_micro_batch(pairs, models):
    _, reference = models
    one_by_one = [score_pairs(reference, [p], [c], [r], device=CPU) for p, c, r in zip(*pairs, strict=True)]
    batched = score_pairs(reference, *pairs, device=CPU, micro_batch=7)
    for key in ("chosen_logps", "rejected_logps"):
        expected = np.array([s[key][0] for s in one_by_one])
        np.testing.assert_allclose(batched[key], expected, rtol=1e-5, atol=1e-4)
    assert len(set(np.round(batched["chosen_logps"], 3))) == len(pairs[0]), "pairs must differ for this test"


def test_pair_scorer_appends_columns_and_keeps_rows(pairs, models):
    ids = pa.list_(pa.int32())
    table = pa.table({"prompt_ids": pa.array(pairs[0], ids), "chosen_ids": pa.array(pairs[1], ids),
                      "rejected_ids": pa.array(pairs[2], ids), "source_index": list(range(len(pairs[0])))})
    out = PairScorer(str(STORIES), prefix="m1_", micro_batch=4)(table)
    assert out.column_names == table.column_names + ["m1_chosen_logps", "m1_rejected_logps", "chosen_tokens",
                                                     "rejected_tokens"]
    assert out.column("source_index").to_pylist() == list(range(len(pairs[0])))
    expected = score_pairs(models[1], *pairs, device=CPU)
    np.testing.assert_allclose(out.column("m1_chosen_logps").to_numpy(), expected["chosen_logps"], atol=1e-4)
    # a second model on the same rows adds its own columns and reuses the token counts
    again = PairScorer(str(STORIES), prefix="m2_")(out)
    assert again.column_names == out.column_names + ["m2_chosen_logps", "m2_rejected_logps"]


def test_bf16_pass_is_close_to_fp32(pairs):
    table = pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in zip(
        ("prompt_ids", "chosen_ids", "rejected_ids"), pairs, strict=True)})
    fp32 = PairScorer(str(STORIES), precision="fp32")(table).column("chosen_logps").to_numpy()
    bf16 = PairScorer(str(STORIES), precision="bf16")(table).column("chosen_logps").to_numpy()
    assert not np.array_equal(fp32, bf16), "bf16 weights must actually be used"
    # bf16 keeps 8 bits of mantissa: per-token log-probs move by ~1e-2 relative; sums by about as much
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)


@pytest.mark.parametrize("layout", ["plain", "shared", "prefix"])
def test_autocast_pass_in_the_training_layout_is_the_policy_itself_at_step_0(pairs, layout):
    """Training in bf16 runs fp32 weights under autocast; the reference pass `plan_scoring` asks for then
    ("autocast", in the training's layout) gives the policy's own log-probs, so every pair's first loss is
    ln 2 exactly. bf16 weights, or another layout, are bf16-rounding away: a fixed error in every pair's
    log-ratio for the whole stage."""
    from sdpo.pair_layout import chunks, collate_shared
    from sdpo.prefix_cache import collate_prefix
    from sdpo.training import autocast

    table = pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in zip(
        ("prompt_ids", "chosen_ids", "rejected_ids"), pairs, strict=True)})
    policy = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    policy.train()
    collate = {"plain": collate_pairs, "shared": collate_shared, "prefix": collate_prefix}[layout]

    def first_losses(scored: pa.Table, batch_size: int = 4) -> torch.Tensor:
        out = []
        for s in range(0, table.num_rows, batch_size):  # training batches, not the pass's micro-batches
            idx = list(range(s, min(s + batch_size, table.num_rows)))
            batch = collate(*([x[i] for i in idx] for x in pairs))
            order = [idx[o] for o in batch["order"].tolist()] if "order" in batch else idx
            batch |= {name: torch.tensor(scored.column(name).to_numpy()[order]) for name in (
                "chosen_tokens", "rejected_tokens")}
            batch |= {"ref_" + name: torch.tensor(scored.column(name).to_numpy()[order]) for name in (
                "chosen_logps", "rejected_logps")}
            for part in (chunks(batch) if layout != "plain" else [batch]):
                with autocast(True, CPU):
                    losses, _ = pair_losses(policy, None, part, DPO)
                out.append(losses.detach())
        return torch.cat(out)

    same = first_losses(PairScorer(str(STORIES), precision="autocast", layout=layout)(table))
    assert torch.equal(same, torch.full_like(same, math.log(2))), (same - math.log(2)).abs().max()
    weights = first_losses(PairScorer(str(STORIES), precision="bf16", layout=layout)(table))
    assert (weights - math.log(2)).abs().max() > 1e-3  # what `auto` used to score with on GPUs


def test_unknown_layout_is_refused(pairs, models):
    with pytest.raises(ValueError, match="layout must be plain, shared or prefix"):
        score_pairs(models[1], *pairs, device=CPU, layout="packed")


@pytest.mark.parametrize("native", [False, True, None])
def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about(pairs, native, monkeypatch, capsys):
    """Without bf16 matmul kernels (AVX2 and older, many ARM servers) a bf16 matmul runs one to two orders of
    magnitude slower than fp32: training and the passes say so, naming the key and the fix; with the
    kernels, on a GPU, or when torch cannot tell, nothing is said."""
    import sdpo.training as training

    monkeypatch.setattr(training, "cpu_bf16_kernels", lambda: native)
    said = training.slow_bf16(CPU, "training.precision")
    if native is False:
        assert "training.precision: fp32" in said and torch.backends.cpu.get_cpu_capability() in said
    else:
        assert said is None
    assert training.slow_bf16(torch.device("cuda"), "training.precision") is None
    table = pa.table({k: pa.array(v[:2], pa.list_(pa.int32())) for k, v in zip(
        ("prompt_ids", "chosen_ids", "rejected_ids"), pairs, strict=True)})
    for precision in ("bf16", "autocast", "fp32"):
        PairScorer(str(STORIES), precision=precision)(table)
        err = capsys.readouterr().err
        assert ("reference.precision: bf16 on a CPU" in err and "training.precision: fp32" in err) == (native is False and precision != "fp32"), (precision, err)
