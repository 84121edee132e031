"""The torch-only stage mechanics: schedule, exact weighting of padded pairs, a few real steps."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo.logprobs import collate_pairs
from sdpo.training import (
    LossSettings,
    build_optimizer,
    disable_dropout,
    freeze,
    lr_multiplier,
    pair_losses,
    scale_gradients,
)

DPO = LossSettings("sigmoid", 0.1, {})


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def make_batch(n, seed=0, weights=None):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    chosen = [torch.randint(3, 40, (3,), generator=g).tolist() + [2] for _ in range(n)]
    rejected = [torch.randint(3, 40, (4,), generator=g).tolist() + [2] for _ in range(n)]
    return collate_pairs(prompts, chosen, rejected, weights=weights)


def test_schedule_warmup_then_decay():
    lin = lr_multiplier("linear", warmup_steps=2, total_steps=10)
    assert lin(0) < lin(1) < lin(2) == 1.0
    assert lin(10) == 0.0 and lin(6) == pytest.approx(0.5)
    cos = lr_multiplier("cosine", warmup_steps=0, total_steps=10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert lr_multiplier("constant", 0, 10)(9) == 1.0


def test_first_loss_is_ln2_when_policy_starts_at_reference():
    policy = tiny_model()
    reference = freeze(copy.deepcopy(policy))
    losses, metrics = pair_losses(policy, reference, make_batch(4), DPO)
    assert torch.allclose(losses, torch.full((4,), math.log(2)), atol=1e-5)
    assert metrics["rewards/margins"].abs().max() < 1e-5


def test_disable_dropout_makes_training_mode_deterministic_and_the_first_loss_ln2():
    """A model with dropout (modules and Llama's functional attention dropout) trains in train mode; with
    its dropout off, its log-ratio against itself in eval mode is exactly 0 (TRL's default too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attention_dropout=0.5, attn_implementation="eager"))
    for model in (gpt2, llama):
        reference = freeze(copy.deepcopy(model))
        model.train()
        noisy, _ = pair_losses(model, reference, make_batch(4), DPO)
        assert not torch.allclose(noisy, torch.full((4,), math.log(2)), atol=1e-4)
        assert disable_dropout(model) > 0
        assert model.training
        losses, metrics = pair_losses(model, reference, make_batch(4), DPO)
        assert torch.allclose(losses, torch.full((4,), math.log(2)), atol=1e-6)
        assert disable_dropout(model) == 0  # nothing left to turn off


def test_zero_weight_padding_leaves_the_gradient_exact():
    """Weighted sum + rescale by 1/(real pairs) == the plain mean over the real pairs alone."""
    policy, reference = tiny_model(0), freeze(tiny_model(1))
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    chosen = [[11, 12, 2], [13, 2], [14, 15, 16, 2]]
    rejected = [[17, 2], [18, 19, 2], [20, 2]]

    losses, _ = pair_losses(policy, reference, collate_pairs(prompts, chosen, rejected), DPO)
    losses.mean().backward()
    expected = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    # the same pairs plus a padding row (a copy of pair 0) that weighs 0, padded to a longer length
    padded = collate_pairs(prompts + [prompts[0]], chosen + [chosen[0]], rejected + [rejected[0]],
                           weights=[1.0, 1.0, 1.0, 0.0])
    losses, _ = pair_losses(policy, reference, padded, DPO)
    (losses * padded["weights"]).sum().backward()
    scale_gradients(policy, 1.0 / float(padded["weights"].sum()))
    for p, e in zip(policy.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)


def test_a_few_steps_change_every_trainable_parameter_and_not_the_reference():
    policy = tiny_model()
    reference = freeze(copy.deepcopy(policy))
    ref_before = copy.deepcopy(reference.state_dict())
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = build_optimizer(policy, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    first = None
    for step in range(5):
        losses, _ = pair_losses(policy, reference, make_batch(8, seed=step % 2), DPO)
        first = first if first is not None else losses.mean().item()
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
    last = pair_losses(policy, reference, make_batch(8, seed=0), DPO)[0].mean().item()
    assert last < first
    for n, p in policy.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference {k} changed"
    assert all(not p.requires_grad for p in reference.parameters())


def test_rng_state_round_trip():
    """A resumed stage continues every random stream where the interrupted one stood."""
    import random

    import numpy as np

    from sdpo.training import capture_rng, restore_rng

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng()
    first = (torch.rand(4), np.random.rand(4), random.random())
    torch.rand(10)  # the run goes on, then "crashes"
    restore_rng(state)
    again = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_train_state_restores_optimizer_and_schedule():
    from sdpo.training import build_optimizer, lr_multiplier, train_state

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = build_optimizer(model, lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier("linear", 2, 10))
        return model, opt, sched

    def step(model, opt, sched):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    model, opt, sched = setup()
    for _ in range(3):
        step(model, opt, sched)
    saved = train_state(opt.state_dict(), sched, rng=[{}], progress={"step": 3}, position={"epoch": 0, "micro": 3})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    resumed, opt2, sched2 = setup()
    resumed.load_state_dict(weights)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    step(resumed, opt2, sched2)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert saved["position"] == {"epoch": 0, "micro": 3} and saved["progress"]["step"] == 3


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    """training.gradient_checkpointing recomputes activations in the backward pass: same numbers, less memory."""
    from sdpo.pair_layout import chunks, collate_shared

    plain = make_batch(4, seed=3)
    reference = freeze(tiny_model(seed=1))
    if layout == "shared":
        n = plain["weights"].shape[0]
        rows = [row[mask.bool()].tolist() for row, mask in zip(plain["input_ids"], plain["attention_mask"], strict=True)]
        comp = [row[m].tolist() for row, m in zip(plain["input_ids"], plain["completion_mask"], strict=True)]
        prompts = [rows[i][:len(rows[i]) - len(comp[i])] for i in range(n)]
        batches = list(chunks(collate_shared(prompts, comp[:n], comp[n:], max_splits=2)))
    else:
        batches = [plain]

    def grads(checkpointing):
        model = tiny_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for batch in batches:
            losses, _ = pair_losses(model, reference, batch, DPO)
            (losses * batch["weights"]).sum().backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_leaves_biases_and_norm_gains_alone():
    """A step with no gradient applies only AdamW's decay: the matrices shrink by lr * wd, while biases
    and norm gains (1-D: decaying them pulls the RMSNorm scale towards 0) stay where they are."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    one_d = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert any(n.endswith(".bias") for n in one_d) and any("ln_" in n for n in one_d)
    for n, p in model.named_parameters():
        expected = before[n] if p.dim() == 1 else before[n] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)
