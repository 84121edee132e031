"""Log-probs from the lm_head in slices (`head_logps`) against one full-logits matmul: same values and
gradients, in float64 exactly, under bf16 autocast at bf16 level; models that rescale logits keep the
full path."""

import pytest
import torch
import torch.nn.functional as F

import sdpo.head_logps as hl
from sdpo.head_logps import kept_logps, logps_head, plain_logps, set_max_logits_mb
from sdpo.logprobs import collate_pairs
from sdpo.pair_layout import chunks, collate_shared
from sdpo.prefix_cache import collate_prefix
from sdpo.scoring import score_pairs
from sdpo.training import LossSettings
from tests.test_pair_layout import _grads, _tiny_pairs


def _mb_for_rows(rows: int, vocab: int) -> float:
    """The budget that slices `rows` rows at a time."""
    return rows * 4 * vocab / 2**20


def _case(dtype, k=11, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    # rows 0 and 5 have two targets each (a prompt's last logit predicts both completions' first token);
    # row 3 has none
    rows = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 0, 5])
    labels = torch.randint(0, vocab, (rows.shape[0],), generator=g)
    upstream = torch.randn(rows.shape[0], generator=g, dtype=torch.float32)
    return hidden, weight, bias, rows, labels, upstream


def _value_and_grads(fn, hidden, weight, bias, upstream):
    for t in (hidden, weight, bias):
        t.grad = None
    out = fn()
    (out * upstream).sum().backward()
    return out.detach(), [t.grad.clone() for t in (hidden, weight, bias)]


@pytest.mark.parametrize("slice_rows", [1, 3, 5])
def test_sliced_values_and_gradients_equal_one_matmul(slice_rows, monkeypatch):
    hidden, weight, bias, rows, labels, upstream = _case(torch.float64)
    calls = []
    monkeypatch.setattr(hl, "_sliced_forward", lambda *a: calls.append(a[5]) or _real_sliced(*a))
    plain = _value_and_grads(lambda: plain_logps(F.linear(hidden, weight, bias), rows, labels),
                             hidden, weight, bias, upstream)
    sliced = _value_and_grads(lambda: kept_logps(hidden, weight, bias, rows, labels,
                                                 max_mb=_mb_for_rows(slice_rows, 50)),
                              hidden, weight, bias, upstream)
    assert calls == [slice_rows]  # the sliced path ran, with that many rows a slice
    torch.testing.assert_close(sliced[0], plain[0], rtol=0, atol=1e-12)
    for name, s, p in zip(("hidden", "weight", "bias"), sliced[1], plain[1], strict=True):
        assert p.abs().max() > 0, name
        torch.testing.assert_close(s, p, rtol=1e-10, atol=1e-12, msg=name)


_real_sliced = hl._sliced_forward


def test_without_gradients_the_slices_give_the_same_values():
    hidden, weight, bias, rows, labels, _ = _case(torch.float64)
    with torch.inference_mode():
        plain = plain_logps(F.linear(hidden, weight, bias), rows, labels)
        sliced = kept_logps(hidden, weight, bias, rows, labels, max_mb=_mb_for_rows(2, 50))
    torch.testing.assert_close(sliced, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_within_the_budget_it_is_the_one_matmul_path(dtype):
    """One matmul, its softmax gradient formed in place (`_FusedLogps`): the values and all three
    gradients equal autograd's through F.linear, logsumexp and gather (the same operations)."""
    hidden, weight, bias, rows, labels, upstream = _case(dtype)
    fused = _value_and_grads(lambda: kept_logps(hidden, weight, bias, rows, labels, max_mb=_mb_for_rows(11, 50)),
                             hidden, weight, bias, upstream)
    out = kept_logps(hidden, weight, bias, rows, labels, max_mb=_mb_for_rows(11, 50))
    assert out.grad_fn.name() == "_FusedLogpsBackward"
    plain = _value_and_grads(lambda: plain_logps(F.linear(hidden, weight, bias), rows, labels),
                             hidden, weight, bias, upstream)
    assert torch.equal(fused[0], plain[0])
    for name, f, p in zip(("hidden", "weight", "bias"), fused[1], plain[1], strict=True):
        assert p.abs().max() > 0, name
        torch.testing.assert_close(f, p, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0, msg=name)
    unbounded = kept_logps(hidden, weight, bias, rows, labels, max_mb=None)
    assert torch.equal(unbounded.detach(), fused[0])
    with torch.no_grad():  # no gradients: autograd's path, no logits kept
        assert torch.equal(kept_logps(hidden, weight, bias, rows, labels), fused[0])


def test_the_fused_backward_refuses_a_second_pass():
    hidden, weight, bias, rows, labels, upstream = _case(torch.float32)
    loss = (kept_logps(hidden, weight, bias, rows, labels) * upstream).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="max_logits_mb"):
        loss.backward()


@pytest.mark.parametrize("block_bytes", [4 * 50, 3 * 4 * 50, 2**20])
def test_cpu_row_blocks_give_the_same_values_and_gradients(block_bytes, monkeypatch):
    """On CPU the elementwise passes run a block of rows at a time (1 row, 3 rows, all): the same numbers."""
    hidden, weight, bias, rows, labels, upstream = _case(torch.float32)
    plain = _value_and_grads(lambda: plain_logps(F.linear(hidden, weight, bias), rows, labels),
                             hidden, weight, bias, upstream)
    monkeypatch.setattr(hl, "_CPU_BLOCK_BYTES", block_bytes)
    for budget in (_mb_for_rows(11, 50), _mb_for_rows(4, 50)):  # fused, and sliced
        got = _value_and_grads(lambda b=budget: kept_logps(hidden, weight, bias, rows, labels, max_mb=b),
                               hidden, weight, bias, upstream)
        torch.testing.assert_close(got[0], plain[0], rtol=0, atol=1e-6)
        for name, g, p in zip(("hidden", "weight", "bias"), got[1], plain[1], strict=True):
            torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(hl.row_logsumexp(weight), torch.logsumexp(weight, -1), rtol=0, atol=1e-6)


def test_bf16_autocast_slices_compute_as_the_linear_would():
    """fp32 master weights under bf16 autocast: the slices compute in bf16 as nn.Linear does, the
    gradients come back in fp32, within bf16 rounding of the one-matmul path."""
    hidden, weight, bias, rows, labels, upstream = _case(torch.float32, k=40, vocab=64)
    rows = torch.cat([torch.arange(40), torch.tensor([0, 7])])
    labels = torch.randint(0, 64, (42,), generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(42, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _value_and_grads(lambda: plain_logps(F.linear(hidden, weight, bias), rows, labels),
                                 hidden, weight, bias, upstream)
        sliced = _value_and_grads(lambda: kept_logps(hidden, weight, bias, rows, labels,
                                                     max_mb=_mb_for_rows(7, 64)), hidden, weight, bias, upstream)
        fused = _value_and_grads(lambda: kept_logps(hidden, weight, bias, rows, labels), hidden, weight, bias,
                                 upstream)
    assert plain[0].dtype == sliced[0].dtype == fused[0].dtype == torch.float32
    assert torch.equal(fused[0], plain[0])  # the same bf16 matmul, the same fp32 logsumexp
    for name, f, p in zip(("hidden", "weight"), fused[1][:2], plain[1][:2], strict=True):  # bias: summed in fp32 here
        assert f.dtype == torch.float32, name
        torch.testing.assert_close(f, p, rtol=1e-2, atol=1e-2 * float(p.abs().max()), msg=name)
    torch.testing.assert_close(sliced[0], plain[0], rtol=0, atol=1e-6)  # same bf16 logits, fp32 lse
    for name, s, p in zip(("hidden", "weight", "bias"), sliced[1], plain[1], strict=True):
        assert s.dtype == torch.float32, name
        torch.testing.assert_close(s, p, rtol=2e-2, atol=2e-2 * float(p.abs().max()), msg=name)


# ---------------------------------------------------------------------------------------------------
# through the model, in both pair layouts


def _llama(seed=0, tied=False, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("layout", ["mask", "prefix"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_sliced_training_step_equals_the_full_logits_one(layout, tied, monkeypatch):
    """Loss and every parameter's gradient (the tied embedding's too), float64, reference online."""
    p, c, r = _tiny_pairs(6, seed=3)
    collate = collate_prefix if layout == "prefix" else collate_shared
    batches = list(chunks(collate(p, c, r, max_splits=2)))
    loss = LossSettings("sigmoid", 0.1, {})
    reference = _llama(seed=1).eval()
    full_loss, full_grads = _grads(_llama(tied=tied), reference, batches, loss)

    sliced = []
    monkeypatch.setattr(hl._ChunkedLogps, "apply", lambda *a: sliced.append(a[5]) or _real_apply(*a))
    policy = _llama(tied=tied)
    assert logps_head(policy) is policy.lm_head
    for m in (policy, reference):
        set_max_logits_mb(m, _mb_for_rows(4, 60))
    sliced_loss, sliced_grads = _grads(policy, reference, batches, loss)
    assert sliced and set(sliced) == {4}  # the policy's completions ran in slices of 4 rows
    assert sliced_loss == pytest.approx(full_loss, abs=1e-12)
    for name, g in full_grads.items():
        torch.testing.assert_close(sliced_grads[name], g, rtol=1e-9, atol=1e-12, msg=name)


_real_apply = hl._ChunkedLogps.apply


@pytest.mark.parametrize("budget_rows", [None, 5])
def test_two_row_sequences_from_the_head_equal_the_full_logits(budget_rows):
    """The two-row layout and the listwise groups (`sequence_logps_sums`): the lm_head only at the positions
    that predict a completion token, sliced or not, against every position's logits (float64)."""
    from sdpo.logprobs import sequence_logps_sums, token_logps_sum

    p, c, r = _tiny_pairs(5, seed=6)
    batch = collate_pairs(p, c, r)
    model = _llama()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    full, full_counts = token_logps_sum(model(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    full.sum().backward()
    full_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    if budget_rows:
        set_max_logits_mb(model, _mb_for_rows(budget_rows, 60))
    sums, counts = sequence_logps_sums(model, batch)
    sums.sum().backward()
    assert torch.equal(counts, full_counts)
    torch.testing.assert_close(sums, full, rtol=0, atol=1e-12)
    for name, q in model.named_parameters():
        torch.testing.assert_close(q.grad, full_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_the_reference_pass_scores_equal_unsliced():
    model = _llama().eval()
    p, c, r = _tiny_pairs(9, seed=4)
    full = score_pairs(model, p, c, r, device=torch.device("cpu"), micro_batch=4)
    set_max_logits_mb(model, _mb_for_rows(3, 60))
    sliced = score_pairs(model, p, c, r, device=torch.device("cpu"), micro_batch=4)
    for key in full:
        torch.testing.assert_close(torch.as_tensor(sliced[key]), torch.as_tensor(full[key]), rtol=0, atol=1e-9)


def test_models_that_rescale_their_logits_keep_the_full_logits():
    """Gemma 2 soft-caps its logits after the lm_head: its head is never asked for log-probs, and the
    shared layout still equals the plain one under a tiny budget."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from transformers.models.cohere.modeling_cohere import CohereForCausalLM
    from transformers.models.granite.modeling_granite import GraniteForCausalLM
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    from sdpo.logprobs import sequence_logps
    from sdpo.pair_layout import shared_sequence_logps

    assert hl._returns_head_output(LlamaForCausalLM)
    for cls in (Gemma2ForCausalLM, CohereForCausalLM, GraniteForCausalLM):
        assert not hl._returns_head_output(cls), cls.__name__
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0)
    config._attn_implementation = "eager"  # Gemma 2 has no sdpa attention in transformers 5.24
    model = Gemma2ForCausalLM(config).double().eval()
    assert logps_head(model) is None
    set_max_logits_mb(model, _mb_for_rows(1, 60))
    p, c, r = _tiny_pairs(3, seed=5)
    plain = sequence_logps(model, collate_pairs(p, c, r))
    batch = collate_shared(p, c, r, max_splits=1)
    shared = shared_sequence_logps(model, batch).double()
    order = batch["order"]
    torch.testing.assert_close(shared[: len(order)], plain[:3][order], rtol=0, atol=1e-9)


def test_the_budget_reaches_the_stage_workers():
    from sdpo.config import ConfigError, parse_job
    from sdpo.pipeline import stage_config
    from sdpo.plan import plan_stages
    from tests.test_plan import MINIMAL, NAMES, SIZES

    job = parse_job(MINIMAL | {"training": {"max_logits_mb": 512}})
    assert stage_config(job, plan_stages(job, NAMES, SIZES)[0], "base", "base", 1)["max_logits_mb"] == 512
    assert parse_job(MINIMAL | {"training": {"max_logits_mb": None}}).training.max_logits_mb is None
    assert parse_job(MINIMAL).training.max_logits_mb == hl.DEFAULT_MAX_LOGITS_MB
    with pytest.raises(ConfigError, match="max_logits_mb"):
        parse_job(MINIMAL | {"training": {"max_logits_mb": 0}})
