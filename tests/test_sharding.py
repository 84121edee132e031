"""Sharded training (sharding.py, FSDP2) against one process, torch only: two gloo ranks on this machine.

Each rank trains its half of every batch; the steps use the stage loop's own mechanics (weighted sum of
per-pair losses, rescale by world / pairs, clipping, AdamW). Same losses, gradient norms and final
weights as one process on the whole batch; the gathered checkpoint is a Hugging Face model; and a run
resumed from a gathered checkpoint (weights + optimiser state, re-sharded) ends where the uninterrupted
run does.
"""

import copy
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from sdpo import head_logps
from sdpo.head_logps import set_max_logits_mb
from sdpo.pair_layout import chunks, collate_shared
from sdpo.sharding import (
    as_float,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    layer_classes,
    load_optimizer_state,
    load_sharded,
    save_sharded,
    shard_model,
)
from sdpo.training import LossSettings, build_optimizer, freeze, pair_losses, scale_gradients

DPO = LossSettings("sigmoid", 0.1, {})
STEPS, PAIRS = 3, 6


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def pairs(step: int):
    g = torch.Generator().manual_seed(step)

    def seq(lo, hi):
        return torch.randint(3, 40, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [([1] + seq(2, 6), seq(1, 5) + [2], seq(1, 6) + [2]) for _ in range(PAIRS)]


def train(policy, reference, optimizer, steps, rank, world):
    """The stage loop's step on this rank's pairs (i % world == rank); returns [(loss, grad_norm)]."""
    log = []
    for step in steps:
        mine = [p for i, p in enumerate(pairs(step)) if i % world == rank]
        # as the worker under FSDP: the same number of length chunks on every rank, each its own
        # forward/backward (collectives); one process cuts its whole batch alike
        batch = collate_shared(*zip(*mine, strict=True), max_splits=2, exact_splits=True)
        total = torch.zeros(())
        for part in chunks(batch):
            losses, _ = pair_losses(policy, reference, part, DPO)
            (losses * part["weights"]).sum().backward()
            total += losses.detach().sum()
        sums = torch.stack([total, torch.tensor(float(len(mine)))])
        if world > 1:
            dist.all_reduce(sums)
        scale_gradients(policy, world / float(sums[1]))  # gradients arrive averaged over the ranks
        norm = as_float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.3))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append((float(sums[0] / sums[1]), norm))
    return log


def run_rank(rank, world, port, out, resume, slice_rows=None):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    policy, reference = tiny_model(), freeze(tiny_model())
    sliced = []
    if slice_rows:  # the lm_head's log-probs in slices of `slice_rows` rows (head_logps), counted
        for m in (policy, reference):
            set_max_logits_mb(m, slice_rows * 4 * m.config.vocab_size / 2**20)
        apply = head_logps._ChunkedLogps.apply
        head_logps._ChunkedLogps.apply = lambda *a: sliced.append(a[5]) or apply(*a)
    sharded = isinstance(resume, dict)  # {"dcp": a save_sharded checkpoint, "step": where it stopped}
    if resume is not None and not sharded:  # each rank reads the checkpoint file and loads the whole
        resume = torch.load(resume, weights_only=False)  # weights before sharding (the gathered format)
        policy.load_state_dict(resume["weights"])
    if world > 1:
        shard_model(policy, torch.device("cpu"), world, bf16=False)
    optimizer = build_optimizer(policy, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    steps = range(STEPS)
    if resume is not None:
        if sharded:  # as the worker does: the initial weights sharded, then each rank's share read back
            load_sharded(policy, optimizer, resume["dcp"])
        else:
            load_optimizer_state(policy, optimizer, resume["optimizer"])
        steps = range(resume["step"], STEPS)
    log = train(policy, reference, optimizer, steps[:1], rank, world)
    # a copy, as the worker's torch.save makes at once: the gathered tensors are not all fresh ones
    middle = copy.deepcopy({"weights": full_state_dict(policy) or policy.state_dict(),
                            "optimizer": full_optimizer_state(policy, optimizer), "step": steps[0] + 1})
    if world > 1 and resume is None:  # the sharded format, every rank into a folder of its own
        save_sharded(policy, optimizer, str(out / f"dcp-rank{rank}"))
    log += train(policy, reference, optimizer, steps[1:], rank, world)
    weights = full_state_dict(policy)
    if rank == 0:
        result = {"log": log, "middle": middle, "sharded": is_sharded(policy), "sliced": sliced}
        result["weights"] = weights if weights is not None else policy.state_dict()
        if weights is not None:  # the worker's checkpoint: save_pretrained of the sharded model, gathered
            policy.save_pretrained(out / "model", state_dict=dict(weights))  # it pops what it writes
        torch.save(result, out / "result.pt")
    if world > 1:
        dist.destroy_process_group()
        # A spawned rank that used torch.distributed.checkpoint sometimes aborts in the interpreter's
        # teardown, after all of the above ("terminate called without an active exception", no Python
        # frame: a C++ thread left joinable at exit). Everything is written: leave without the teardown.
        os._exit(0)


def launch(world, out, resume=None, slice_rows=None):
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:
        run_rank(0, 1, port, out, resume, slice_rows)
    else:
        mp.start_processes(run_rank, args=(world, port, out, resume, slice_rows), nprocs=world,
                           start_method="spawn")
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharding")
    return {"one": launch(1, base / "one"), "two": launch(2, base / "two"), "base": base}


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.timeout(300)
def test_two_sharded_ranks_train_like_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert two["sharded"] and not one["sharded"]
    assert len(two["log"]) == STEPS
    for (l1, n1), (l2, n2) in zip(one["log"], two["log"], strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert n2 == pytest.approx(n1, rel=1e-5)
    assert min(n for _, n in one["log"]) > 0.3  # the clip acted: the DTensor norm drove it on the sharded side too
    # the weights moved (lr 1e-2) and moved alike
    start = tiny_model().state_dict()
    assert max((one["weights"][k] - start[k]).abs().max().item() for k in start) > 1e-3
    assert_weights_close(two["weights"], one["weights"], atol=1e-5)


@pytest.mark.timeout(300)
def test_sharded_ranks_with_the_lm_head_in_slices_train_like_one_process(runs):
    """Under FSDP the sliced log-probs run inside the lm_head's forward, where its weight is gathered,
    and their gradient reaches the sharded weight: same trajectory as one process with whole logits."""
    one = runs["one"]
    sliced = launch(2, runs["base"] / "two-sliced", slice_rows=3)
    assert sliced["sharded"] and sliced["sliced"] and set(sliced["sliced"]) == {3}
    for (l1, n1), (l2, n2) in zip(one["log"], sliced["log"], strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert n2 == pytest.approx(n1, rel=1e-5)
    assert_weights_close(sliced["weights"], one["weights"], atol=1e-5)


@pytest.mark.timeout(300)
def test_gathered_checkpoint_is_a_hugging_face_model(runs):
    loaded = LlamaForCausalLM.from_pretrained(runs["base"] / "two" / "model")
    assert_weights_close(loaded.state_dict(), runs["two"]["weights"], atol=0.0)


@pytest.mark.timeout(300)
def test_resume_from_a_gathered_checkpoint_reshards_weights_and_optimizer(runs, tmp_path):
    """Stop after step 1, gather weights and AdamW state, restart two fresh ranks from them."""
    torch.save(runs["two"]["middle"], tmp_path / "checkpoint.pt")
    # (a file, not the spawn arguments: those become shared memory, and both ranks would step one
    # Adam `step` tensor)
    resumed = launch(2, tmp_path / "resumed", resume=tmp_path / "checkpoint.pt")
    assert len(resumed["log"]) == STEPS - 1
    assert [round(x, 6) for x, _ in resumed["log"]] == [round(x, 6) for x, _ in runs["two"]["log"][1:]]
    assert_weights_close(resumed["weights"], runs["two"]["weights"], atol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 1])
def test_resume_from_sharded_checkpoint_files(runs, tmp_path, world):
    """Stop after step 1 with every rank's shard written to its own folder (no rank gathers anything);
    merge the folders, as Ray Train merges the ranks' reported checkpoints; restart from them on two
    fresh ranks and, re-sharded by DCP, on one process."""
    merged = tmp_path / "merged"
    for rank in range(2):
        shutil.copytree(runs["base"] / "two" / f"dcp-rank{rank}", merged, dirs_exist_ok=True)
    names = sorted(p.name for p in merged.iterdir())
    assert ".metadata" in names and {"__0_0.distcp", "__1_0.distcp"} <= set(names)
    assert not (runs["base"] / "two" / "dcp-rank1" / ".metadata").exists()  # rank 0 alone indexes
    resumed = launch(world, tmp_path / "resumed", resume={"dcp": str(merged), "step": 1})
    assert resumed["sharded"] == (world == 2)
    # the same ranks: the same sums; one process: float summation order (as the uninterrupted runs)
    tol = 1e-6 if world == 2 else 1e-5
    assert [x for x, _ in resumed["log"]] == pytest.approx([x for x, _ in runs["two"]["log"][1:]], rel=tol)
    assert_weights_close(resumed["weights"], runs["two"]["weights"], atol=tol)


def test_a_model_without_named_layers_is_refused():
    with pytest.raises(ValueError, match="_no_split_modules.*parallelism: ddp"):
        layer_classes(torch.nn.Linear(2, 2))
