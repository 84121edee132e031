"""Benchmark: per-worker training state and peak memory, DDP vs FSDP (`training.parallelism`).

Starts W ranks (gloo on CPU, nccl on GPUs: one per GPU) and trains the same model on the same real
pairs for a few steps each way, exactly as the stage loop steps (shared-prompt layout, weighted sum,
clip, AdamW). Per rank it prints the bytes of training state it holds — parameters, gradients and AdamW
moments, counted from the tensors themselves (a shard's local part under FSDP) — the peak resident
memory (CPU) or peak allocated memory (GPU), and seconds per step. With W ranks FSDP should hold ~1/W of
DDP's state; the step pays the all-gathers and reduce-scatters. For FSDP it also times a mid-stage
checkpoint both ways: gathered (the whole weights and AdamW state materialised on rank 0, as before) and
sharded (`sharding.save_sharded`, what the worker writes: each rank its own share, nothing gathered).

Torch only (no Ray). From the repository root:

    .venv/bin/python benchmarks/sharded_memory.py --synthetic-llama 25m            # 2 ranks on this CPU
    python benchmarks/sharded_memory.py --device cuda --world 8 --synthetic-llama 85m

Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_pass import _positive, _shared, add_synthetic_args, build_model, setup  # noqa: E402

from sdpo.pair_layout import chunks, collate_shared  # noqa: E402
from sdpo.sharding import as_float, full_optimizer_state, full_state_dict, save_sharded, shard_model  # noqa: E402
from sdpo.training import LossSettings, autocast, build_optimizer, pair_losses  # noqa: E402

LOSS = LossSettings("sigmoid", 0.1, {})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=_shared("models/stories260K"))
    add_synthetic_args(p)
    p.add_argument("--data", type=Path, default=_shared("data/ultrafeedback_binarized_1k.jsonl"))
    p.add_argument("--world", type=_positive, default=2, help="ranks (processes); one per GPU on cuda")
    p.add_argument("--batch", type=_positive, default=4, help="pairs per rank per step")
    p.add_argument("--steps", type=_positive, default=3)
    p.add_argument("--max-length", type=_positive, default=512)
    p.add_argument("--max-prompt-length", type=_positive, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads per rank")
    args = p.parse_args(argv)
    args.pairs = args.world * args.batch * args.steps
    return args


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimiser state this rank holds (local shards under FSDP)."""

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def size(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = [p for p in model.parameters()]
    out = {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None)}
    out["adam"] = sum(size(v) for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    return out


def run_rank(rank: int, args, mode: str, port: int, results) -> None:
    cuda = args.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // args.world))
    args.threads = None
    _, tok, pairs, _ = setup(args)
    model = build_model(args, tok, torch.float32, device)
    bf16 = args.precision == "bf16"
    if mode == "fsdp":
        shard_model(model, device, args.world, bf16=bf16)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    p, c, r = pairs
    times = []
    for step in range(args.steps):
        lo = (step * args.world + rank) * args.batch
        # as the worker: FSDP cuts every rank's batch into the same number of chunks (each is a collective)
        batch = collate_shared(p[lo:lo + args.batch], c[lo:lo + args.batch], r[lo:lo + args.batch],
                               exact_splits=mode == "fsdp")
        parts = list(chunks(batch))
        dist.barrier()
        t0 = time.perf_counter()
        for i, part in enumerate(parts):
            part = {k: v.to(device) for k, v in part.items()}
            # precompute mode: the reference log-probs arrive with the batch (zeros will do here)
            part["ref_chosen_logps"] = part["ref_rejected_logps"] = torch.zeros(len(part["weights"]), device=device)
            sync = contextlib.nullcontext() if mode == "fsdp" or i == len(parts) - 1 else model.no_sync()
            with sync, autocast(bf16, device):
                losses, _ = pair_losses(model, None, part, LOSS)
                (losses * part["weights"]).sum().backward()
        as_float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        state = state_bytes(model, optimizer)  # before zero_grad: the gradients are held at their peak
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    results[rank] = {**state, "peak": peak, "step_s": min(times[1:] or times)}
    if mode == "fsdp":
        results[rank] = results[rank] | checkpoint_costs(model, optimizer)
    dist.destroy_process_group()
    # (a rank that used torch.distributed.checkpoint may abort in the interpreter's teardown: see
    # tests/test_sharding.py; everything is reported, so leave without it)
    os._exit(0)


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_costs(model, optimizer) -> dict:
    """Seconds and bytes this rank holds or writes for one checkpoint, gathered and sharded."""
    dist.barrier()
    t0 = time.perf_counter()
    held = tensor_bytes(full_state_dict(model)) + tensor_bytes(full_optimizer_state(model, optimizer))
    dist.barrier()
    gathered_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        dist.barrier()
        t0 = time.perf_counter()
        save_sharded(model, optimizer, d)
        dist.barrier()
        sharded_s = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in Path(d).iterdir())
    return {"gathered_mb": held / 2**20, "gathered_s": gathered_s, "sharded_mb": written / 2**20,
            "sharded_s": sharded_s}


def measure(args, mode: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(run_rank, args=(args, mode, port, results), nprocs=args.world, start_method="spawn")
        return dict(results)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs; this machine has {torch.cuda.device_count()}")
    model = args.synthetic_llama or args.model.name
    print(f"{model}, {args.world} ranks on {args.device}, {args.batch} pairs per rank per step, {args.precision}")
    print(f"{'':6} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'adam MB':>8} {'state MB':>9} {'peak MB':>8} "
          f"{'s/step':>7}")
    mb = 2**20
    totals = {}
    for mode in ("ddp", "fsdp"):
        res = measure(args, mode)
        for rank in sorted(res):
            x = res[rank]
            total = x["params"] + x["grads"] + x["adam"]
            totals.setdefault(mode, []).append(total)
            print(f"{mode:6} {rank:>4} {x['params'] / mb:>10.1f} {x['grads'] / mb:>9.1f} {x['adam'] / mb:>8.1f} "
                  f"{total / mb:>9.1f} {x['peak'] / mb:>8.0f} {x['step_s']:>7.2f}")
    print(f"training state per rank, fsdp / ddp: {max(totals['fsdp']) / max(totals['ddp']):.3f} "
          f"(1/{args.world} = {1 / args.world:.3f})")
    print("fsdp mid-stage checkpoint, per rank: gathered = whole weights + AdamW state held in memory (the "
          "old format); sharded = own share written (sharding.save_sharded)")
    for rank in sorted(res):
        x = res[rank]
        print(f"  rank {rank}: gathered {x['gathered_mb']:8.1f} MB held, {x['gathered_s']:.2f} s | "
              f"sharded {x['sharded_mb']:8.1f} MB written, {x['sharded_s']:.2f} s")


if __name__ == "__main__":
    main()
