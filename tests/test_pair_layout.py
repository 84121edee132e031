"""The shared-prompt pair layout against the plain one: same log-probs, losses and gradients.

The real stories260K model, in float64 so that "equal" means equal up to summation order.
"""

import copy
import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpo.logprobs import collate_pairs, sequence_logps
from sdpo.pair_layout import (
    attention_mask,
    chunks,
    collate_shared,
    shared_sequence_logps,
    split_points,
    supports_shared_prompt,
)
from sdpo.training import LossSettings, pair_losses
from tests.conftest import STORIES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64)
    # perturb so that the policy and the reference below differ
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _pairs(n, seed=0, vocab=500):
    rng = random.Random(seed)

    def seq(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))]

    prompts = [seq(1, 30) for _ in range(n)]
    # one-token completions (EOS only) and very unequal lengths are the edge cases
    chosen = [seq(0, 40) + [2] for _ in range(n)]
    rejected = [seq(0, 40) + [2] for _ in range(n)]
    return prompts, chosen, rejected


def _shared_logps(model, batch, average=False, layout=shared_sequence_logps):
    """Run every chunk and put the values back in the plain layout's order (chosen 0..B-1, rejected B..)."""
    b = batch["order"].shape[0]
    out = torch.zeros(2 * b, dtype=torch.float64)
    for part in chunks(batch):
        v = layout(model, part, average=average).double()
        n = part["order"].shape[0]
        out[part["order"]], out[part["order"] + b] = v[:n], v[n:]
    return out


def _grads(model, reference, batches, loss):
    """(sum of the weighted losses, every parameter's gradient) of backward passes over `batches`."""
    total = 0.0
    for batch in batches:
        losses, _ = pair_losses(model, reference, batch, loss)
        weighted = (losses * batch["weights"]).sum()
        weighted.backward()
        total += float(weighted.detach())
    return total, {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
def test_logps_equal_the_plain_layout(model, attn, average):
    m = copy.deepcopy(model)
    m.config._attn_implementation = attn
    assert supports_shared_prompt(m)
    p, c, r = _pairs(7)
    plain = sequence_logps(m, collate_pairs(p, c, r), average=average).double()
    shared = _shared_logps(m, collate_shared(p, c, r, max_splits=3), average=average)
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-4)  # the float32 sum of ~70 token log-probs


def test_loss_and_gradients_equal_the_plain_layout(model):
    """The step back-propagates sum_i w_i loss_i: over the chunks of the shared layout it must give the
    plain layout's gradient, with the reference run online in the same layout."""
    p, c, r = _pairs(6, seed=1)
    weights = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # a padding row (weight 0) as workers get
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict({k: v + 0.01 for k, v in reference.state_dict().items()})
    loss = LossSettings("sigmoid", 0.1, {})

    plain_loss, plain_grads = _grads(copy.deepcopy(model), reference, [collate_pairs(p, c, r, weights=weights)], loss)
    shared = collate_shared(p, c, r, weights=weights, max_splits=3)
    shared_loss, shared_grads = _grads(copy.deepcopy(model), reference, list(chunks(shared)), loss)
    assert abs(shared_loss - plain_loss) < 1e-6
    assert plain_loss != pytest.approx(4 * 0.6931, abs=1e-3)  # policy != reference: not the trivial ln 2
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)  # logits are summed in fp32


def test_bf16_autocast_stays_at_bf16_level(model):
    """Under bf16 autocast both layouts round differently; they agree to bf16 precision (documented)."""
    m = copy.deepcopy(model).float()
    p, c, r = _pairs(5, seed=2)
    exact = sequence_logps(m, collate_pairs(p, c, r)).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sequence_logps(m, collate_pairs(p, c, r)).double()
        shared = _shared_logps(m, collate_shared(p, c, r))
    scale = exact.abs().max()
    assert (plain - exact).abs().max() / scale < 2e-2
    assert (shared - exact).abs().max() / scale < 2e-2


def test_rejected_never_sees_chosen_and_positions_restart():
    p, c, r = [[5, 6, 7]], [[8, 9, 2]], [[10, 2]]
    batch = collate_shared(p, c, r)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 10, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    mask = attention_mask(batch)[0, 0]
    assert mask[6].tolist() == [True, True, True, False, False, False, True, False]  # rejected's first token
    assert mask[5].tolist() == [True] * 6 + [False, False]  # chosen's last token: causal, prompt + chosen
    assert not mask.triu(1).any()
    eager = attention_mask(batch, additive_dtype=torch.float32)[0, 0]
    assert eager[6, 3] == torch.finfo(torch.float32).min and eager[6, 2] == 0


def test_padding_rows_attend_only_to_themselves():
    batch = collate_shared([[5], [5, 6, 7]], [[2], [8, 2]], [[2], [9, 9, 2]])
    mask = attention_mask(batch)[:, 0]
    short = int((batch["order"] == 0).nonzero())  # the row of the 3-token pair, padded to 8
    assert mask[short, 5].tolist() == [False] * 5 + [True, False, False]


def area(lengths, bounds):
    """Padded area of rows sorted longest first, cut at `bounds`."""
    return sum((e - s) * lengths[s] for s, e in itertools.pairwise(bounds))


def test_splits_minimise_padding_and_cost_a_call_only_when_it_pays():
    rng = random.Random(0)
    for _ in range(50):
        lengths = sorted((rng.randrange(1, 200) for _ in range(rng.randrange(1, 9))), reverse=True)
        bounds = split_points(lengths, 3, min_gain=0.0)
        assert bounds[0] == 0 and bounds[-1] == len(lengths) and bounds == sorted(set(bounds))
        brute = min(area(lengths, [0, *cuts, len(lengths)])
                    for k in range(3) for cuts in itertools.combinations(range(1, len(lengths)), k))
        assert area(lengths, bounds) == brute
    assert split_points([100, 99, 98, 97], 4) == [0, 4]  # nothing to gain: one call
    assert split_points([400, 10, 10, 10], 4) == [0, 1, 4]


def test_chunks_trim_each_to_its_longest_row():
    p, c, r = _pairs(8, seed=3)
    batch = collate_shared(p, c, r, max_splits=4)
    widths = [part["input_ids"].shape[1] for part in chunks(batch)]
    rows = sum(part["input_ids"].shape[0] for part in chunks(batch))
    assert rows == 8 and widths == sorted(widths, reverse=True)
    real = sum(len(a) + len(b) + len(d) for a, b, d in zip(p, c, r, strict=True))
    padded = sum(part["input_ids"].numel() for part in chunks(batch))
    assert padded < batch["input_ids"].numel() and padded >= real


def test_a_model_without_logits_to_keep_gives_the_same_values(model):
    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask, position_ids, use_cache):  # no logits_to_keep
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    p, c, r = _pairs(4, seed=4)
    batch = collate_shared(p, c, r)
    torch.testing.assert_close(_shared_logps(Plain(model), batch), _shared_logps(model, batch))


def test_flash_attention_is_not_offered_the_layout(model):
    m = copy.copy(model)
    m.config = copy.deepcopy(model.config)
    m.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prompt(m)


def test_reference_pass_scores_equal_the_plain_layout(model):
    from sdpo.scoring import score_pairs

    p, c, r = _pairs(13, seed=5)
    cpu = torch.device("cpu")
    plain = score_pairs(model, p, c, r, device=cpu, micro_batch=4, layout="plain")
    shared = score_pairs(model, p, c, r, device=cpu, micro_batch=4, layout="shared")
    for key in plain:  # back in input order, every pair
        assert (abs(plain[key] - shared[key]) < 1e-4).all(), key
    assert shared["chosen_tokens"].tolist() == [len(x) for x in c]


def test_exact_splits_give_every_rank_the_same_number_of_calls():
    """FSDP: each chunk's forward/backward is a collective, so the count must not depend on the lengths."""
    rng = random.Random(1)
    for _ in range(50):
        lengths = sorted((rng.randrange(1, 200) for _ in range(rng.randrange(1, 9))), reverse=True)
        bounds = split_points(lengths, 3, exact=True)
        assert len(bounds) - 1 == min(3, len(lengths)) and bounds == sorted(set(bounds))
        brute = min(area(lengths, [0, *cuts, len(lengths)])
                    for cuts in itertools.combinations(range(1, len(lengths)), len(bounds) - 2))
        assert area(lengths, bounds) == brute  # still the least padding for that many chunks
    assert split_points([100, 99, 98, 97], 4, exact=True) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# The prefix-cache variant (`prefix_cache`): the prompt once through the KV cache, no 4D mask
# --------------------------------------------------------------------------------------------------
def tiny_llama(attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def _tiny_pairs(n, seed=0):
    """Variable lengths; pair 0 has a 1-token chosen, pair 1 a 1-token rejected and a 1-token prompt."""
    p, c, r = _pairs(n, seed=seed, vocab=60)
    c[0] = [2]
    if n > 1:
        p[1], r[1] = [7], [2]
    return p, c, r


def _prefix_logps(model, batch, average=False):
    """As `_shared_logps`, for a `collate_prefix` batch (through `chunks`)."""
    from sdpo.prefix_cache import prefix_sequence_logps

    return _shared_logps(model, batch, average, layout=prefix_sequence_logps)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fails the test if the prefix-cache layout falls back to the 4D-mask one."""
    import sdpo.prefix_cache as pc

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the mask layout")

    monkeypatch.setattr(pc, "shared_sequence_logps", refuse)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("n", [1, 7])
def test_prefix_cache_logps_equal_the_plain_layout(attn, average, n, no_fallback):
    from sdpo.prefix_cache import collate_prefix

    m = tiny_llama(attn)
    assert supports_shared_prompt(m)
    p, c, r = _tiny_pairs(n, seed=n)
    plain = sequence_logps(m, collate_pairs(p, c, r), average=average).double()
    prefix = _prefix_logps(m, collate_prefix(p, c, r, max_splits=3), average=average)
    torch.testing.assert_close(prefix, plain, rtol=0, atol=1e-5)


def test_prefix_cache_of_one_token_completions_still_makes_every_call(no_fallback):
    """1-token completions need only the prompts' logits, but the chunk still calls the model for chosen
    and rejected (keeping nothing): under DDP and FSDP every call is a collective, and a rank whose chunk
    made fewer calls than another's would hang the stage."""
    from sdpo.prefix_cache import collate_prefix, computed_positions

    m = tiny_llama()
    calls = []
    m.model.register_forward_hook(lambda *args: calls.append(1))
    p, c, r = [[5, 6, 7], [8]], [[2], [2]], [[2], [2]]
    batch = collate_prefix(p, c, r)
    assert computed_positions(batch) == 2 * 3
    torch.testing.assert_close(_prefix_logps(m, batch), sequence_logps(m, collate_pairs(p, c, r)).double(),
                               rtol=0, atol=1e-5)
    parts = len(list(chunks(batch)))
    assert len(calls) == 3 * parts + 1  # prompts, chosen, rejected a chunk; then the plain layout's one call


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n", [1, 6])
def test_prefix_cache_loss_and_gradients_equal_the_plain_layout(attn, n, no_fallback):
    """The completions' loss reaches the prompt's computation through the cached keys/values: every
    parameter's gradient equals the plain layout's (fp32, reference online in the same layout)."""
    from sdpo.prefix_cache import collate_prefix

    p, c, r = _tiny_pairs(n, seed=10 + n)
    weights = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0][:n] if n > 1 else [1.0]
    reference = tiny_llama(attn, seed=1).eval()
    loss = LossSettings("sigmoid", 0.1, {})
    plain_loss, plain_grads = _grads(tiny_llama(attn), reference, [collate_pairs(p, c, r, weights=weights)], loss)
    batch = collate_prefix(p, c, r, weights=weights, max_splits=3)
    prefix_loss, prefix_grads = _grads(tiny_llama(attn), reference, list(chunks(batch)), loss)
    assert prefix_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, g in plain_grads.items():
        assert g.abs().max() > 0, name  # every parameter takes part, the prompt's layers included
        torch.testing.assert_close(prefix_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_prefix_cache_falls_back_to_the_mask_layout_under_gradient_checkpointing(monkeypatch):
    """transformers drops the cache in a checkpointed training forward: the mask layout runs instead."""
    import sdpo.prefix_cache as pc
    from sdpo.prefix_cache import collate_prefix, uses_cache

    calls = []
    real = pc.shared_sequence_logps
    monkeypatch.setattr(pc, "shared_sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    p, c, r = _tiny_pairs(5, seed=3)
    loss = LossSettings("sigmoid", 0.1, {})
    reference = tiny_llama(seed=1).eval()
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert not uses_cache(model)
    with torch.no_grad():
        assert uses_cache(model)  # no backward, no checkpointing: the cache is kept
    batch = collate_prefix(p, c, r, max_splits=2)
    prefix_loss, prefix_grads = _grads(model, reference, list(chunks(batch)), loss)
    assert len(calls) == len(list(chunks(batch)))  # the policy's chunks; the reference (eval) uses the cache
    plain_loss, plain_grads = _grads(tiny_llama(), reference, [collate_pairs(p, c, r)], loss)
    assert prefix_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(prefix_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_prefix_batch_as_shared_rows_equals_collate_shared():
    from sdpo.prefix_cache import as_shared, collate_prefix

    p, c, r = _tiny_pairs(6, seed=4)
    prefix, shared = collate_prefix(p, c, r, max_splits=1), collate_shared(p, c, r, max_splits=1)
    assert prefix["order"].tolist() == shared["order"].tolist()
    rows = as_shared(prefix)
    for key in ("input_ids", "position_ids", "prompt_len", "chosen_len", "rejected_len", "weights"):
        assert rows[key].tolist() == shared[key].tolist(), key


def test_prefix_chunks_trim_each_part_and_minimise_computed_positions():
    from sdpo.prefix_cache import collate_prefix, computed_positions, prefix_splits

    p, c, r = _pairs(8, seed=6)
    batch = collate_prefix(p, c, r, max_splits=4)
    parts = list(chunks(batch))
    assert sum(part["order"].shape[0] for part in parts) == 8
    for part in parts:
        for key, length in (("prompt_ids", "prompt_len"), ("chosen_ids", "chosen_len"),
                            ("rejected_ids", "rejected_len")):
            assert part[key].shape[1] == int(part[length].max()), key
    assert sum(computed_positions(part) for part in parts) <= computed_positions(batch)

    def cost(lens, bounds):  # prompts, chosen and rejected each padded to their longest; no last column
        return sum((e - s) * (sum(max(x[k] for x in lens[s:e]) for k in range(3)) - 2)
                   for s, e in itertools.pairwise(bounds))

    rng = random.Random(1)
    for _ in range(30):
        lens = [(rng.randrange(1, 50), rng.randrange(1, 50), rng.randrange(1, 50)) for _ in range(rng.randrange(1, 8))]
        lens.sort(key=lambda x: -sum(x))
        bounds = prefix_splits(lens, 3, min_gain=0.0)
        brute = min(cost(lens, [0, *cuts, len(lens)])
                    for k in range(3) for cuts in itertools.combinations(range(1, len(lens)), k))
        assert cost(lens, bounds) == brute
