"""Benchmark: the lm_head's log-probs within the logits budget, autograd's path against `_FusedLogps`.

Within `training.max_logits_mb`, `sdpo/head_logps.py` computes a forward's kept logits with one matmul.
Before 2026-12-01 autograd differentiated them (`plain_logps(F.linear(...))`: logsumexp and gather, whose
backward allocates four more [K, V] tensors). `_FusedLogps` forms the softmax's gradient in place in the
logits it kept and, on CPU, runs each elementwise pass a cache-sized block of rows at a time. This times
whole training steps (`throughput.train_step`, the worker's step) both ways on the same model, pairs and
starting weights, in interleaved repetitions (A B, then B A, ...) so that a machine's drift hits both,
and checks that the losses of every step are identical.

Torch only (no Ray). From the repository root:

    .venv/bin/python benchmarks/head_backward.py --synthetic-llama 25m --vocab 32000 --layout prefix
    .venv/bin/python benchmarks/head_backward.py --synthetic-llama 25m --vocab 32000 --layout shared

Results measured on a 2-core CPU are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (the same setup, model and step as the throughput benchmark)

import sdpo.head_logps as hl  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every other argument is throughput.py's (--model, --synthetic-llama, --vocab, "
                                       "--data, --pairs, --batch, --threads, --max-logits-mb, ...); fp32 only.")
    p.add_argument("--layout", choices=["shared", "prefix"], default="prefix")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of each variant")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=True,
                   help="the reference inside the step (as throughput.py --online)")
    own, rest = p.parse_known_args(argv)
    base = throughput.parse_args([*rest, "--precision", "fp32", "--layouts", own.layout, "--no-reference-pass"])
    return argparse.Namespace(**vars(base), **{k: v for k, v in vars(own).items() if k != "online"},
                              ab_online=own.online)


class Variant:
    """Switches `head_logps` between autograd's path (before) and `_FusedLogps` with CPU row blocks (after)."""

    fused, block = hl._FusedLogps.apply, hl._CPU_BLOCK_BYTES

    @classmethod
    def use(cls, name: str) -> None:
        if name == "autograd":
            hl._FusedLogps.apply = lambda h, w, b, rows, labels, dtype: hl.plain_logps(F.linear(h, w, b), rows, labels)
            hl._CPU_BLOCK_BYTES = 1 << 62  # one block: torch.logsumexp over all rows, as before
        else:
            hl._FusedLogps.apply, hl._CPU_BLOCK_BYTES = cls.fused, cls.block


def main(argv=None) -> None:
    args = parse_args(argv)
    device, tok, pairs, _ = throughput.setup(args)
    steps = len(pairs[0]) // args.batch
    if steps < 2:
        raise SystemExit(f"--pairs {args.pairs} gives {steps} batch of {args.batch}: need two (one is the warm-up)")
    reference = None
    if args.ab_online:
        torch.manual_seed(1)  # as throughput.py: the reference is the model with seeded noise
        reference = throughput.build_model(args, tok, torch.float32, device)
        with torch.no_grad():
            for t in reference.parameters():
                t.add_(0.01 * torch.randn_like(t))
        throughput.freeze(reference)
    policy = throughput.build_model(args, tok, torch.float32, device)
    policy.train()
    scores = None
    if reference is None:
        with torch.no_grad():
            p, c, r = (x[:steps * args.batch] for x in pairs)
            scores = throughput.score_pairs(policy, p, c, r, device=device, micro_batch=args.micro_batch,
                                            layout=args.layout)
    batches, _ = throughput.make_batches(tuple(x[:steps * args.batch] for x in pairs), scores, args.layout,
                                         args.batch, device)
    start = copy.deepcopy(policy.state_dict())
    seconds: dict[str, list[float]] = {"autograd": [], "fused": []}
    losses: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = ("autograd", "fused") if rep % 2 == 0 else ("fused", "autograd")
        for name in order:
            Variant.use(name)
            policy.load_state_dict(start)
            optimizer = throughput.build_optimizer(policy, lr=throughput.LR, weight_decay=0.0, betas=(0.9, 0.999),
                                                   eps=1e-8)
            throughput.train_step(policy, reference, optimizer, batches[0], args.layout, False, device)  # warm-up
            throughput.sync(device)
            t0 = time.perf_counter()
            run = [throughput.train_step(policy, reference, optimizer, b, args.layout, False, device)
                   for b in batches[1:]]
            throughput.sync(device)
            seconds[name].append(time.perf_counter() - t0)
            losses.setdefault(name, run)
            if run != losses[name]:
                raise SystemExit(f"{name}: a repetition gave other losses ({run} vs {losses[name]})")
            print(f"{name:8s} repetition {rep + 1}: {seconds[name][-1]:.1f} s for {len(batches) - 1} steps",
                  flush=True)
    Variant.use("fused")
    vocab = policy.get_output_embeddings().weight.shape[0]
    best = {k: min(v) for k, v in seconds.items()}
    print(f"layout {args.layout}, vocabulary {vocab}, {len(batches) - 1} timed steps of {args.batch} pairs, "
          f"reference {'online' if reference is not None else 'precomputed'}")
    for name in ("autograd", "fused"):
        print(f"  {name:8s} " + ", ".join(f"{s:.1f}" for s in seconds[name]) + f" s (best {best[name]:.1f})")
    print(f"  speed-up, best against best: {best['autograd'] / best['fused']:.3f}x; "
          f"mean against mean: {sum(seconds['autograd']) / sum(seconds['fused']):.3f}x")
    same = losses["autograd"] == losses["fused"]
    print(f"  losses of every step identical: {same}")
    if not same:
        raise SystemExit(f"the two paths' losses differ: {losses}")


if __name__ == "__main__":
    main()
