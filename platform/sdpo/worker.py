"""The per-worker loop of one sDPO stage (Ray Train V2).

Each worker streams its shard of the stage's partition, trains the policy initialised from `init`,
and at the end rank 0 writes the model and tokenizer in Hugging Face format (plus the step log) as
the stage's checkpoint. With `reference.mode: precompute` (the default) the reference log-probs
arrive with the rows (computed by the cached reference pass, passes.py) and the worker holds only
the policy; with `online` it loads the frozen reference and runs it inside every step. Held-out
evaluation is a separate pass after the stage. The mechanics live in `training.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConsistencyMode

from sdpo.head_logps import DEFAULT_MAX_LOGITS_MB, set_max_logits_mb
from sdpo.logprobs import collate_groups, collate_pairs, row_groups
from sdpo.pair_layout import chunks, collate_shared, completion_tokens, supports_shared_prompt
from sdpo.prefix_cache import collate_prefix
from sdpo.scoring import load_model
from sdpo.sharding import (
    as_float,
    full_state_dict,
    is_sharded,
    load_optimizer_state,
    load_sharded,
    save_sharded,
    shard_model,
)
from sdpo.training import (
    GROUP_REFERENCE_COLUMNS,
    REFERENCE_COLUMNS,
    TRAIN_METRICS,
    LossSettings,
    autocast,
    build_optimizer,
    capture_rng,
    disable_dropout,
    fingerprint,
    freeze,
    lr_multiplier,
    means_from_sums,
    pair_losses,
    restore_rng,
    scale_gradients,
    slow_bf16,
    train_state,
    use_bf16,
    weighted_sums,
)

STEP_LOG = "trainer_log.jsonl"
SHARDED = "sharded"  # a sharded run's mid-stage checkpoint: every rank's shard of weights and AdamW (DCP)
STAGE_METRICS = "stage_metrics.json"
TRAIN_STATE = "train_state.pt"


class PairCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> pair tensors: the shared-prompt layout (`pair_layout.collate_shared`, rows
    sorted by length and cut into chunks; with `prefix`, `prefix_cache.collate_prefix`) or the plain one
    (`logprobs.collate_pairs`). Runs in Ray Data's prefetch threads, so the step never waits on it."""

    def __init__(self, shared: bool = False, max_splits: int = 1, exact_splits: bool = False,
                 prefix: bool = False):
        self.shared, self.max_splits, self.exact_splits, self.prefix = shared, max_splits, exact_splits, prefix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.shared:
            collate = collate_prefix if self.prefix else collate_shared
            out = collate(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"],
                          weights=batch["weight"], max_splits=self.max_splits, exact_splits=self.exact_splits)
        else:
            out = collate_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"],
                                weights=batch["weight"])
        for name in REFERENCE_COLUMNS:  # reference.mode: precompute
            if name in batch:
                values = torch.tensor(np.asarray(batch[name]))  # a copy: Arrow buffers are read-only
                out[name] = values[out["order"]] if self.shared else values
        return out


class GroupCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> every row's group of completions, padded to [B, K] views (listwise losses;
    see `logprobs.collate_groups`)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        groups = row_groups(batch["chosen_ids"], batch["rejected_ids"], batch["responses_ids"])
        out = collate_groups(batch["prompt_ids"], groups, weights=batch["weight"])
        shape = out["group_mask"].shape
        for name in ("rewards",) + GROUP_REFERENCE_COLUMNS:
            if name in batch:
                padded = np.zeros(shape, np.float64)
                for b, values in enumerate(batch[name]):
                    padded[b, :len(values)] = values
                out[name] = torch.from_numpy(padded)
        for name in ("chosen_index", "rejected_index"):
            out[name] = torch.tensor(np.asarray(batch[name], np.int64))
        return out


class DeferredCollate(NumpyBatchCollateFn):
    """A collate function whose settings are known only once the model has loaded (the shared-prompt
    layout depends on its attention). Ray Data's prefetch threads may call it before that: they wait
    here while the read and shuffle upstream go on."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._collate: Any = None

    def resolve(self, collate: Any) -> None:
        self._collate = collate
        self._ready.set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        self._ready.wait()
        return self._collate(batch)


def _never_collated(batch: Any) -> Any:
    raise RuntimeError("the stage stopped before training: this batch was read ahead and is not used")


class Primed:
    """An iterable whose first item is fetched now, in a thread, so that the stream's start-up (for a
    stage's partition: the read and the shuffle's all-to-all sort) overlaps whatever the caller does
    next (loading the models). Iterating it yields the same items in the same order."""

    def __init__(self, iterable: Any):
        self._it = iter(iterable)
        self._head: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="sdpo-prime-data", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._head.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as err:  # raised in the consumer's thread, where it can fail the stage
            self._error = err

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._head
        yield from self._it


def _load(ref: Any, cfg: dict, device: torch.device) -> torch.nn.Module:
    return load_model(ref, dtype=torch.float32, device=device, revision=cfg.get("revision"),
                      trust_remote_code=cfg["trust_remote_code"])


def _allreduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def stage_loop(cfg: dict) -> None:
    """Train one stage. `cfg` is built by `pipeline.stage_config`.

    Resumable: every `checkpoint_every` optimiser steps rank 0 reports a checkpoint holding the policy,
    the optimiser and scheduler, every rank's RNG and the data position. When Ray Train restarts the
    worker group after a failure (`FailureConfig`), or a resumed driver refits the same run, the loop
    starts from that checkpoint (`ray.train.get_checkpoint()` wins over `init`), skips the micro-batches
    already consumed in the interrupted epoch, and ends with the same optimiser steps and pairs as an
    uninterrupted run.
    """
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train logs every report's full metrics dict at INFO; the step log and summary carry them.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    bf16 = use_bf16(cfg["precision"], device)
    if bf16 and rank == 0 and (slow := slow_bf16(device, "training.precision")):
        _progress(slow)
    loss = LossSettings(cfg["loss_type"], cfg["beta"], cfg["loss_options"])

    shard = ray.train.get_dataset_shard("train")
    checkpoint = ray.train.get_checkpoint()
    # A fresh stage starts its first epoch's stream now: reading the partition and the shuffle's sort
    # run while the models load. The collate settings follow the load (DeferredCollate). A resumed
    # stage starts its stream in the loop, from the epoch its checkpoint names.
    deferred, primed = DeferredCollate(), None
    if checkpoint is None and cfg["epochs"] > 0 and cfg["total_steps"] > 0:
        primed = Primed(_epoch_batches(shard, cfg, 0, deferred))
    # a sharded checkpoint's folder stays until every rank has read its shard back (below)
    checkpoint_dir = contextlib.ExitStack()
    try:
        resume = _resume_point(checkpoint, cfg, device, checkpoint_dir)
        policy = resume["policy"] if resume and "policy" in resume else _load(cfg["init"], cfg, device)
        reference = None
        if cfg["reference_mode"] == "online" and loss.needs_reference:
            reference = freeze(_load(cfg["reference"], cfg, device))
        # Proof the reference stays frozen and is exactly M_{t-1}; rank 0 alone writes the stage metrics.
        reference_digest = fingerprint(reference) if rank == 0 and reference is not None else None
        for m in (policy, reference):  # the lm_head's logits budget (head_logps.py)
            if m is not None:
                set_max_logits_mb(m, cfg.get("max_logits_mb", DEFAULT_MAX_LOGITS_MB))
        policy.train()
        if cfg.get("disable_dropout", True):
            disable_dropout(policy)
        if cfg.get("gradient_checkpointing"):
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shared = bool(cfg.get("shared_prompt")) and not loss.listwise and supports_shared_prompt(policy)
        if cfg.get("shared_prompt") and not shared and rank == 0 and not loss.listwise:
            _progress(f"[stage {cfg['stage']}] shared_prompt needs sdpa or eager attention; this model uses "
                      f"{policy.config._attn_implementation!r}: two rows per pair instead")
        # the prompt through the KV cache (prefix_cache.py); gradient checkpointing drops the cache
        prefix = shared and bool(cfg.get("prefix_cache")) and not cfg.get("gradient_checkpointing")
        fsdp = cfg.get("parallelism") == "fsdp" and world > 1
        # FSDP: every chunk's forward and backward are collectives, so all ranks cut alike (equal split:
        # every rank's micro-batch has the same rows). DDP syncs once a window whatever the count.
        deferred.resolve(GroupCollate() if loss.listwise else PairCollate(
            shared, cfg.get("length_splits", 1), fsdp, prefix=prefix))
    except BaseException:
        deferred.resolve(_never_collated)  # the read-ahead thread must not wait forever
        checkpoint_dir.close()
        raise
    if cfg.get("parallelism") == "fsdp" and world == 1:
        _progress(f"[stage {cfg['stage']}] parallelism fsdp with one worker: nothing to shard, training unsharded")
    if fsdp:  # sharded in place: `policy` is the FSDP module (mid-stage checkpoints stay sharded; the
        # stage's final model is gathered, sharding.full_state_dict)
        model = shard_model(policy, device, world, bf16=bf16)
    else:
        model = ray.train.torch.prepare_model(policy) if world > 1 else policy

    optimizer = build_optimizer(model, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                                betas=cfg["adam_betas"], eps=cfg["adam_epsilon"])
    total = cfg["total_steps"]
    warmup = math.ceil(cfg["warmup_ratio"] * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg["lr_scheduler"], warmup, total))
    accum = cfg["gradient_accumulation_steps"]

    log: list[dict] = []
    # window = [real pairs, weighted metric sums..., non-padding tokens] for the current optimiser step
    window = torch.zeros(2 + len(TRAIN_METRICS), device=device)
    # t0: the clock of pairs/s and elapsed_s; each epoch's data start-up moves it on (see _timed)
    state = {"step": 0, "pairs": 0.0, "tokens": 0.0, "t0": time.perf_counter(), "data_wait_s": 0.0,
             "data_startup_s": 0.0}
    start_epoch, skip = 0, 0
    if resume:
        log, start_epoch, skip = resume["log"], resume["position"]["epoch"], resume["position"]["micro"]
        progress = resume["progress"]
        state.update(step=progress["step"], pairs=progress["pairs"], tokens=progress["tokens"],
                     t0=time.perf_counter() - progress["elapsed_s"],
                     data_startup_s=progress.get("data_startup_s", 0.0), data_wait_s=progress.get("data_wait_s", 0.0))
        if "sharded" in resume:  # the initial weights were sharded above: each rank reads its share
            load_sharded(model, optimizer, resume["sharded"])
        elif resume.get("optimizer") is not None:
            load_optimizer_state(model, optimizer, resume["optimizer"])
        if "scheduler" in resume:  # a mid-stage checkpoint (a stage's final one has nothing to resume)
            scheduler.load_state_dict(resume["scheduler"])
            restore_rng(resume["rng"][rank])
        if rank == 0:
            _progress(f"[stage {cfg['stage']} {cfg['partition']}] resuming from its checkpoint at step "
                      f"{state['step']}/{total} (epoch {start_epoch + 1}, {skip} micro-batches in)")
    checkpoint_dir.close()
    for epoch in range(start_epoch, cfg["epochs"] if state["step"] < total else start_epoch):
        batches = primed if primed is not None and epoch == 0 else _epoch_batches(shard, cfg, epoch, deferred)
        micro = 0
        for micro, batch in enumerate(_timed(batches, state), start=1):
            if epoch == start_epoch and micro <= skip:
                continue  # consumed before the interruption: the stream is deterministic, so skip it
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            parts = list(chunks(batch)) if shared else [batch]
            for i, part in enumerate(parts):
                # DDP all-reduces gradients in the window's last backward only (the sum is the same);
                # FSDP has no no_sync here and reduce-scatters after every backward.
                last = micro % accum == 0 and i == len(parts) - 1
                with _no_sync(model, world, skip=last):
                    with autocast(bf16, device):
                        losses, metrics = pair_losses(model, reference, part, loss)
                    (losses * part["weights"]).sum().backward()
                window[:-1] += weighted_sums(metrics, part["weights"], TRAIN_METRICS)
                window[-1] += _real_tokens(part)
            if micro % accum == 0:
                log.append(_optimizer_step(model, optimizer, scheduler, window, world, cfg, state, epoch))
                every = cfg.get("checkpoint_every")
                if every and state["step"] % every == 0 and state["step"] < total:
                    _checkpoint(policy, optimizer, scheduler, log, state, {"epoch": epoch, "micro": micro}, rank,
                                world, cfg)
                _inject_fault(cfg, state["step"], rank)
        if micro % accum:  # a partial window at the end of the epoch: its backwards ran under no_sync
            _average_gradients(model, world)
            log.append(_optimizer_step(model, optimizer, scheduler, window, world, cfg, state, epoch))

    elapsed = time.perf_counter() - state["t0"]  # training time: the data start-ups are not in it
    summary = _stage_summary(log, state["step"], elapsed + state["data_startup_s"])
    summary |= _peak_memory(device, world)
    if reference is not None:
        summary["reference_fingerprint"] = reference_digest
        summary["reference_unchanged"] = rank != 0 or fingerprint(reference) == reference_digest
    summary["pairs_trained"] = state["pairs"]
    # Seconds this worker's loop waited for Ray Data: for each epoch's first batch (the stream's start-up:
    # reading the partition and the seeded shuffle's all-to-all sort), then for the others (~0 when
    # prefetch keeps up; the fraction is of the training time after the start-ups).
    summary["data_startup_s"] = state["data_startup_s"]
    summary["data_wait_s"] = state["data_wait_s"]
    summary["data_wait_fraction"] = state["data_wait_s"] / max(elapsed, 1e-9)
    summary["resumed_from_step"] = resume["progress"]["step"] if resume else None
    _report(policy, cfg, log, summary, rank, progress=_progress_of(state), position={"epoch": cfg["epochs"], "micro": 0})


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------
def _progress_of(state: dict) -> dict:
    return {"step": state["step"], "pairs": state["pairs"], "tokens": state["tokens"],
            "elapsed_s": time.perf_counter() - state["t0"], "data_startup_s": state["data_startup_s"],
            "data_wait_s": state["data_wait_s"]}


def _resume_point(checkpoint, cfg: dict, device: torch.device, folders: contextlib.ExitStack) -> dict | None:
    """The state saved in this run's latest checkpoint (mid-stage, or the stage's final one), if any.
    A sharded run's mid-stage checkpoint holds no whole model: `sharded` names its DCP folder, kept
    open in `folders` for `sharding.load_sharded` once the model is sharded, and no `policy` is loaded
    (the stage's initial weights are, then overwritten)."""
    if checkpoint is None:
        return None
    d = folders.enter_context(checkpoint.as_directory())
    path = Path(d, TRAIN_STATE)
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    saved["log"] = [json.loads(line) for line in Path(d, STEP_LOG).read_text().splitlines() if line]
    if Path(d, SHARDED, ".metadata").exists():
        saved["sharded"] = str(Path(d, SHARDED))
    else:
        saved["policy"] = load_model(d, dtype=torch.float32, device=device, trust_remote_code=cfg["trust_remote_code"])
    return saved


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _checkpoint(policy, optimizer, scheduler, log, state, position, rank, world, cfg) -> None:
    """A mid-stage checkpoint (a barrier: every rank reports). Unsharded: rank 0 reports the model and
    the optimiser state. Sharded: every rank writes its own shard of both (`sharding.save_sharded`) and
    reports its folder, which Ray Train merges into one checkpoint; nothing is gathered."""
    rngs = _gather(capture_rng(), world)
    sharded = is_sharded(policy)
    metrics = {"checkpoint_step": state["step"]}
    with tempfile.TemporaryDirectory() as tmp:
        if sharded:
            save_sharded(policy, optimizer, str(Path(tmp, SHARDED)))  # a collective
        if rank == 0:
            if not sharded:  # every rank holds the whole model and optimiser state: rank 0 saves them
                policy.save_pretrained(tmp)
            torch.save(train_state(None if sharded else optimizer.state_dict(), scheduler, rng=rngs,
                                   progress=_progress_of(state), position=position), Path(tmp, TRAIN_STATE))
            Path(tmp, STEP_LOG).write_text("".join(json.dumps(e) + "\n" for e in log))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 or sharded else None)
    if rank != 0:
        return
    # The controller registers reports when it next polls the workers (every ~2 s): until then a crash
    # would lose this checkpoint. Wait until it is committed, so a checkpoint logged is one that counts.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    _progress(f"[stage {cfg['stage']} {cfg['partition']}] checkpoint at step {state['step']} committed")


def _inject_fault(cfg: dict, step: int, rank: int) -> None:
    """Fault injection for tests and drills: `SDPO_INJECT_FAULT="stage=2,step=5,rank=0,once=/tmp/marker"`
    makes that rank exit hard (no cleanup, like a lost node) right after that optimiser step, once: the
    marker file records that it fired."""
    spec = cfg.get("inject_fault")
    if not spec:
        return
    f = dict(item.split("=", 1) for item in spec.split(","))
    if int(f["stage"]) != cfg["stage"] or int(f["step"]) != step or int(f.get("rank", 0)) != rank:
        return
    marker = f.get("once")
    if marker:
        if os.path.exists(marker):
            return
        Path(marker).write_text(f"fired at stage {cfg['stage']} step {step} rank {rank}\n")
    _progress(f"[stage {cfg['stage']}] injected fault: rank {rank} exits at step {step}")
    os._exit(1)


def _epoch_batches(shard, cfg: dict, epoch: int, collate: Any):
    """One epoch of this worker's shard as collated tensors, two batches prefetched. The partition is
    globally shuffled once per stage; later epochs also reshuffle locally, so no two epochs see the same
    order (every rank still gets the same number of batches)."""
    reshuffle = cfg["shuffle"] and epoch > 0
    return shard.iter_torch_batches(
        batch_size=cfg["batch_size"], collate_fn=collate, prefetch_batches=2,
        local_shuffle_buffer_size=8 * cfg["batch_size"] if reshuffle else None,
        local_shuffle_seed=cfg["seed"] * 100 + epoch if reshuffle else None,
    )


def _timed(batches, state: dict):
    """The batches, adding the time spent waiting for the first to state["data_startup_s"] (and moving
    the pairs/s clock past it) and for each other to state["data_wait_s"]."""
    it = iter(batches)
    first = True
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited = time.perf_counter() - t0
        if first:
            state["data_startup_s"] += waited
            state["t0"] += waited
            first = False
        else:
            state["data_wait_s"] += waited
        yield batch


def _no_sync(model, world: int, *, skip: bool):
    """DDP's no_sync() for a backward whose gradients are only accumulated (not the window's last)."""
    import contextlib

    if world > 1 and not skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _average_gradients(model, world: int) -> None:
    """What DDP's all-reduce would have done: the mean of the workers' accumulated gradients. A sharded
    (FSDP) model has no no_sync here: every backward already reduce-scattered its gradients."""
    if world > 1 and not is_sharded(model):
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of the batch's real rows (padding rows weigh 0), counted as two sequences per
    pair (prompt+chosen, prompt+rejected) whatever the layout, so tokens/s compare across layouts."""
    if "prompt_len" in batch:
        return (completion_tokens(batch).float() * batch["weights"]).sum()
    per_seq = batch["attention_mask"].sum(-1).float()
    weights = batch["weights"]
    if "group_index" in batch:  # listwise: sequence i belongs to row group_index[i] // K
        k = batch["group_mask"].shape[1]
        return (per_seq * weights[batch["group_index"] // k]).sum()
    b = weights.shape[0]
    return ((per_seq[:b] + per_seq[b:]) * weights).sum()


def _optimizer_step(model, optimizer, scheduler, window, world, cfg, state, epoch) -> dict:
    """Rescale, clip and apply the accumulated gradients; return the step's log entry."""
    sums = _allreduce(window.clone(), world)
    window.zero_()
    pairs = float(sums[0])
    # DDP averaged the per-worker weighted sums; rescale to the mean over the window's real pairs.
    scale_gradients(model, world / max(pairs, 1.0))
    grad_norm = as_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"] or float("inf")))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["pairs"] += pairs
    state["tokens"] += float(sums[-1])
    step = state["step"]
    elapsed = time.perf_counter() - state["t0"]
    entry = {"step": step, "epoch": epoch, "pairs": pairs, "lr": lr, "grad_norm": grad_norm,
             **means_from_sums(sums[:-1], TRAIN_METRICS), "elapsed_s": elapsed,
             "pairs_per_s": state["pairs"] / elapsed, "tokens_per_s": state["tokens"] / elapsed}
    if ray.train.get_context().get_world_rank() == 0 and (step % cfg["logging_steps"] == 0 or step == cfg["total_steps"]):
        _progress(
            f"[stage {cfg['stage']} {cfg['partition']}] step {step}/{cfg['total_steps']} "
            f"loss {entry['loss']:.4f} acc {entry['rewards/accuracies']:.2f} "
            f"margin {entry['rewards/margins']:+.4f} lr {lr:.2e} {entry['pairs_per_s']:.1f} pairs/s"
        )
    return entry


def _progress(line: str) -> None:
    # Ray Train patches print() into its logger, which reaches the driver twice; write directly.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stage_summary(log, steps, seconds) -> dict:
    def mean(key):
        vals = [e[key] for e in log if math.isfinite(e[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    out = {"steps": steps, "train_seconds": seconds, "first_step_loss": log[0]["loss"] if log else float("nan")}
    if log:
        out.update({f"train/{k}": mean(k) for k in TRAIN_METRICS})
        out.update({f"final/{k}": log[-1][k] for k in TRAIN_METRICS})
        out["pairs_per_s"] = log[-1]["pairs_per_s"]
        out["tokens_per_s"] = log[-1]["tokens_per_s"]
    return out


def _peak_memory(device: torch.device, world: int) -> dict:
    """Every rank's peak resident memory (MiB; `ru_maxrss` is KiB on Linux, bytes on macOS) and, on
    CUDA, its peak allocated tensor memory, gathered to every rank (a collective: all ranks call it).
    `peak_rss_mib` is the largest over the ranks: the scale checks read it (benchmarks/scale_memory.py)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ranks = _gather((rss, cuda), world)
    out = {"peak_rss_mib": max(r for r, _ in ranks), "peak_rss_mib_by_rank": [r for r, _ in ranks]}
    if cuda is not None:
        out["cuda_max_allocated_mib"] = max(c for _, c in ranks)
        out["cuda_max_allocated_mib_by_rank"] = [c for _, c in ranks]
    return out


def _report(policy, cfg, log, summary, rank, *, progress: dict, position: dict) -> None:
    """The stage's final checkpoint: the model and tokenizer in Hugging Face format, the step log and
    metrics, and a small trainer state marking the stage complete (no optimiser: nothing to resume)."""
    weights = full_state_dict(policy)  # sharded: gathered to rank 0 (a collective); else None, saved as is
    if rank != 0:
        ray.train.report(summary, checkpoint=None)
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(tmp, state_dict=weights)
        AutoTokenizer.from_pretrained(cfg["tokenizer"], revision=cfg.get("revision"),
                                      trust_remote_code=cfg["trust_remote_code"]).save_pretrained(tmp)
        Path(tmp, STEP_LOG).write_text("".join(json.dumps(e) + "\n" for e in log))
        Path(tmp, STAGE_METRICS).write_text(json.dumps(summary, indent=2))
        torch.save({"progress": progress, "position": position}, Path(tmp, TRAIN_STATE))
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))
