"""Sequence log-probs: prompt and padding masked, equal to a direct per-sequence computation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo.logprobs import (
    collate_groups,
    collate_pairs,
    row_groups,
    sequence_logps,
    split_pairs,
    to_groups,
    token_logps_sum,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


PAIRS = [  # (prompt, chosen, rejected) of different lengths, so every row is padded differently
    ([1, 5, 6, 7], [8, 9, 2], [10, 2]),
    ([1, 11], [12, 13, 14, 15, 2], [16, 17, 2]),
    ([1, 20, 21, 22, 23, 24], [25, 2], [26, 27, 28, 2]),
]


def direct_logp(model, prompt, completion):
    """log p(completion | prompt) from one unpadded sequence and a full log-softmax."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(logp[len(prompt) + i - 1, tok].item() for i, tok in enumerate(completion))


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_direct_computation(model, side):
    prompts, chosen, rejected = (list(x) for x in zip(*PAIRS, strict=True))
    batch = collate_pairs(prompts, chosen, rejected, pad_id=0, padding_side=side)
    with torch.no_grad():
        c, r = split_pairs(sequence_logps(model, batch))
    for i, (p, ch, rj) in enumerate(PAIRS):
        assert c[i].item() == pytest.approx(direct_logp(model, p, ch), abs=1e-4)
        assert r[i].item() == pytest.approx(direct_logp(model, p, rj), abs=1e-4)


def test_average_divides_by_completion_length(model):
    prompts, chosen, rejected = (list(x) for x in zip(*PAIRS, strict=True))
    batch = collate_pairs(prompts, chosen, rejected)
    with torch.no_grad():
        total = sequence_logps(model, batch)
        mean = sequence_logps(model, batch, average=True)
    lengths = torch.tensor([len(x) for x in chosen + rejected], dtype=torch.float32)
    assert torch.allclose(mean, total / lengths, atol=1e-6)


def test_masks_select_only_completion_tokens():
    batch = collate_pairs([[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]], padding_side="right")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0], [1, 2, 3, 6, 7, 8, 9]]
    assert batch["completion_mask"].sum(-1).tolist() == [2, 4]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 7]
    left = collate_pairs([[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]], padding_side="left")
    assert left["input_ids"][0].tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert left["position_ids"][0].tolist()[2:] == [0, 1, 2, 3, 4]


def test_prompt_and_padding_do_not_count():
    """Logits at prompt and padding positions may be anything: the sums must not change."""
    batch = collate_pairs([[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]])
    logits = torch.randn(2, batch["input_ids"].shape[1], 12)
    sums, counts = token_logps_sum(logits, batch["input_ids"], batch["completion_mask"])
    noisy = logits.clone()
    noisy[:, :2] += 100 * torch.randn_like(noisy[:, :2])  # positions predicting prompt tokens only
    noisy[0, 5:] += 100  # row 0's padding
    sums2, _ = token_logps_sum(noisy, batch["input_ids"], batch["completion_mask"])
    assert torch.allclose(sums, sums2)
    assert counts.tolist() == [2, 4]


def test_weights_default_to_one_and_are_carried():
    assert collate_pairs([[1]], [[2]], [[3]])["weights"].tolist() == [1.0]
    assert collate_pairs([[1], [1]], [[2], [2]], [[3], [4]], weights=[1.0, 0.0])["weights"].tolist() == [1.0, 0.0]


GROUPS = [  # (prompt, K completions): K = 3 and K = 2 in one batch
    ([1, 5, 6], [[8, 9, 2], [10, 2], [11, 12, 13, 14, 2]]),
    ([1, 20, 21, 22], [[25, 2], [26, 27, 2]]),
]


def test_groups_collate_every_response_and_index_the_b_by_k_view(model):
    """Row 0 has 3 responses, row 1 has 2: the [2, 3] view has slot (1, 2) masked; each real slot holds
    exactly the log-prob of its own prompt + response computed on its own."""
    prompts = [g[0] for g in GROUPS]
    batch = collate_groups(prompts, [g[1] for g in GROUPS], weights=[1.0, 0.0])
    assert batch["input_ids"].shape[0] == 5
    assert batch["group_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["group_index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["weights"].tolist() == [1.0, 0.0]
    with torch.no_grad():
        view = to_groups(sequence_logps(model, batch), batch, fill=float("nan"))
    for b, (prompt, responses) in enumerate(GROUPS):
        for k, completion in enumerate(responses):
            assert view[b, k].item() == pytest.approx(direct_logp(model, prompt, completion), abs=1e-4)
    assert torch.isnan(view[1, 2])


def test_pair_rows_form_two_response_groups():
    assert row_groups([[1]], [[2]], [[]]) == [[[1], [2]]]
    assert row_groups([[1]], [[2]], [None]) == [[[1], [2]]]
    assert row_groups([[1]], [[2]], [[[3], [1], [2]]]) == [[[3], [1], [2]]]
