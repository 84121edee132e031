"""Every loss of the registry through the training step on the real stories260K model and real pairs.

No Ray: the step (`training.pair_losses` / `group_losses`), the collation of pairs and of K-response
groups, and the scoring pass's log-probs are the same code the Ray workers and passes run. For each
loss: the first step with policy = reference gives the loss's value at rho = 0 (ln 2 for DPO, ln K for
InfoNCA, ...), a few optimiser steps on one batch lower it, and every metric stays finite. Listwise
losses give the same loss and gradients with the reference precomputed by the scoring pass as with
the reference run inside the step (tolerances as in test_scoring.py: fp32, only padding differs).
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo.logprobs import collate_groups, collate_pairs, row_groups
from sdpo.losses import LOSSES, get_loss, listwise_loss, preference_loss
from sdpo.rows import prepare_record
from sdpo.scoring import score_groups, score_pairs
from sdpo.training import LossSettings, freeze, pair_losses

from .conftest import STORIES, ULTRAFEEDBACK

CPU = torch.device("cpu")
BETA = 0.1
PAIRWISE = sorted(n for n, s in LOSSES.items() if not s.listwise)
LISTWISE = sorted(n for n, s in LOSSES.items() if s.listwise)


@pytest.fixture(scope="module")
def rows(shared):
    """12 UltraFeedback pairs with their scores, and K = 3 groups made from them: chosen, rejected and
    the next row's rejected answer (given the lowest reward), so K-response rows hold real text."""
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    records = [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()[:13]]
    kw = dict(max_length=96, max_prompt_length=48, eos_id=tok.eos_token_id)
    pairs = [prepare_record(r, tok, **kw) for r in records[:12]]
    groups = []
    for r, nxt in zip(records[:12], records[1:13], strict=True):
        low = min(r["score_chosen"], r["score_rejected"]) - 1.0
        groups.append(prepare_record({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], nxt["rejected"]],
                                      "rewards": [r["score_chosen"], r["score_rejected"], low]}, tok, **kw))
    return pairs, groups


def pair_batch(pairs, reference):
    p, c, r = ([getattr(x, f) for x in pairs] for f in ("prompt_ids", "chosen_ids", "rejected_ids"))
    scores = score_pairs(reference, p, c, r, device=CPU, micro_batch=5)
    return collate_pairs(p, c, r) | {
        "ref_chosen_logps": torch.tensor(scores["chosen_logps"]), "ref_rejected_logps": torch.tensor(scores["rejected_logps"]),
        "chosen_tokens": torch.tensor(scores["chosen_tokens"]), "rejected_tokens": torch.tensor(scores["rejected_tokens"]),
    }


def group_batch(groups, reference):
    """What worker.GroupCollate builds from a scored entry: groups, padded rewards and reference values."""
    g = row_groups([x.chosen_ids for x in groups], [x.rejected_ids for x in groups], [x.responses_ids for x in groups])
    prompts = [x.prompt_ids for x in groups]
    logps, tokens = score_groups(reference, prompts, g, device=CPU, micro_batch=5)
    batch = collate_groups(prompts, g)
    shape = batch["group_mask"].shape

    def padded(values):
        out = np.zeros(shape)
        for b, v in enumerate(values):
            out[b, :len(v)] = v
        return torch.from_numpy(out)

    return batch | {"rewards": padded([x.rewards for x in groups]), "ref_group_logps": padded(logps),
                    "group_tokens": padded(tokens),
                    "chosen_index": torch.tensor([x.chosen_index for x in groups]),
                    "rejected_index": torch.tensor([x.rejected_index for x in groups])}


def value_at_zero(name: str, settings: LossSettings, batch) -> torch.Tensor:
    """The loss when policy = reference (h = 0 for every response); simpo has no reference, so it is
    computed on the policy's own log-probs by the caller instead."""
    spec = get_loss(name)
    if spec.listwise:
        zeros = torch.zeros(batch["group_mask"].shape, dtype=torch.float64)
        return listwise_loss(name, zeros, zeros, batch["rewards"], beta=BETA, mask=batch["group_mask"],
                             **settings.options)
    zero = torch.zeros(1, dtype=torch.float64)
    return preference_loss(name, zero, zero, zero, zero, beta=BETA, **settings.options)


def train_steps(name, batch, reference, steps=8):
    settings = LossSettings(name, BETA, {k: o.default for k, o in get_loss(name).options.items()})
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        losses, metrics = pair_losses(policy, None, batch, settings)
        history.append((losses.detach().clone(), {k: v.clone() for k, v in metrics.items()}))
        optimizer.zero_grad()
        losses.mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None), name
        optimizer.step()
    return settings, history


def perturbed_policy(seed: int):
    """stories260K with small random changes: a policy that differs from its reference, as after training."""
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy


@pytest.fixture(scope="module")
def reference(shared):
    return freeze(AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32))


@pytest.mark.parametrize("name", PAIRWISE + LISTWISE)
def test_each_loss_trains_a_stage_with_finite_metrics(name, rows, reference):
    pairs, groups = rows
    listwise = get_loss(name).listwise
    batch = group_batch(groups, reference) if listwise else pair_batch(pairs, reference)
    settings, history = train_steps(name, batch, reference)
    first_losses, first_metrics = history[0]
    for losses, metrics in history:
        assert torch.isfinite(losses).all(), name
        assert all(torch.isfinite(v).all() for v in metrics.values()), name
    if get_loss(name).needs_reference:
        # step 1: the policy is exactly the reference, so every pair sits at rho = 0 — up to the fp32
        # difference between the scoring pass's batching and the step's (< 1e-4 in log-prob)
        assert first_losses.double() == pytest.approx(value_at_zero(name, settings, batch).expand_as(first_losses),
                                                      abs=1e-4)
        assert first_metrics["rewards/margins"].abs().max() < 1e-4
    if listwise:  # K = 3 everywhere: InfoNCA starts at ln 3
        assert name != "infonca" or first_losses.mean().item() == pytest.approx(math.log(3), abs=1e-4)
    # the median pair: with one shared tiny model a pair can overshoot (nca_pair penalises chosen rewards
    # past ln 2), but the typical pair's loss must fall
    assert history[-1][0].median() < first_losses.median() - 1e-3, f"{name}: 8 steps on one batch did not lower the loss"


@pytest.mark.parametrize("name", LISTWISE)
def test_listwise_precompute_equals_online(name, rows, reference):
    _, groups = rows
    batch = group_batch(groups, reference)
    settings = LossSettings(name, BETA, {})
    policy = perturbed_policy(1)
    results = []
    for ref in (None, reference):
        policy.zero_grad()
        losses, metrics = pair_losses(policy, ref, batch, settings)
        losses.sum().backward()
        results.append((losses.detach(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (pre, m_pre, g_pre), (online, m_online, g_online) = results
    assert torch.allclose(pre, online, atol=2e-5)
    assert torch.allclose(m_pre["rewards/margins"], m_online["rewards/margins"], atol=2e-5)
    for a, b in zip(g_pre, g_online, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_group_scores_match_pair_scores(rows, reference):
    """Scoring a K-response group gives, at chosen_index/rejected_index, the log-probs pair scoring gives."""
    _, groups = rows
    g = row_groups([x.chosen_ids for x in groups], [x.rejected_ids for x in groups], [x.responses_ids for x in groups])
    prompts = [x.prompt_ids for x in groups]
    logps, tokens = score_groups(reference, prompts, g, device=CPU, micro_batch=4)
    pairs = score_pairs(reference, prompts, [x.chosen_ids for x in groups], [x.rejected_ids for x in groups],
                        device=CPU, micro_batch=3)
    chosen = np.array([lp[x.chosen_index] for lp, x in zip(logps, groups, strict=True)])
    rejected = np.array([lp[x.rejected_index] for lp, x in zip(logps, groups, strict=True)])
    assert np.allclose(chosen, pairs["chosen_logps"], atol=1e-4)
    assert np.allclose(rejected, pairs["rejected_logps"], atol=1e-4)
    assert [len(t) for t in tokens] == [3] * len(groups)
    assert all((t > 0).all() for t in tokens)


def test_two_response_infonca_with_hard_labels_trains_like_dpo(rows, reference):
    """A pair's group is [chosen, rejected]; with rewards (+1e4, -1e4) the InfoNCA target is one-hot, so the
    listwise step on K = 2 groups gives DPO's loss and gradients on the same pairs."""
    pairs, _ = rows
    hard = [dataclasses.replace(x, rewards=[1e4, -1e4]) for x in pairs]
    gb, pb = group_batch(hard, reference), pair_batch(pairs, reference)
    policy = perturbed_policy(2)
    out = []
    for name, batch in (("infonca", gb), ("sigmoid", pb)):
        policy.zero_grad()
        losses, _ = pair_losses(policy, None, batch, LossSettings(name, BETA, {}))
        losses.sum().backward()
        out.append((losses.detach(), [p.grad.clone() for p in policy.parameters()]))
    assert torch.allclose(out[0][0], out[1][0], atol=2e-5)
    # the two batches hold the same 24 sequences in another row order (interleaved vs chosen-block), so
    # each gradient entry sums the same terms in another order: fp32 round-off, measured ~1e-6 of the
    # tensor's norm; a wrong target or sign moves it by O(1)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()
