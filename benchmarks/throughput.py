"""Benchmark: training-stage and reference-pass throughput, ours (plain and fast layouts) against TRL.

For one model and one set of real pairs it times, after a warm-up on the first batch each:

  train          forward+backward+clip+AdamW of the policy, exactly as `worker.stage_loop` steps:
                 `reference.mode: precompute` (reference log-probs as batch columns), or `--online`
                 (the frozen reference run inside the step, as TRL's DPOTrainer does by default);
  reference pass `scoring.score_pairs`, the cached pass before every stage (inference only), in the
                 layout and numerics the pipeline scores with (fp32 weights, bf16 autocast in bf16);
  TRL            (`--trl`, the `bench` extra) `trl.DPOTrainer` on the same tokens, model, batch, precision,
                 loss (sigmoid, beta 0.1), lr and order, reference online, gradient checkpointing off as
                 ours (`--trl-checkpointing on`: TRL's own default) — with the ratio ours/TRL and both
                 first-batch losses, which must agree.

Training rows, ours and TRL's, are timed on the same pairs: the first batch is the warm-up and batches
2..⌊pairs/batch⌋ are timed (so --pairs is at least two batches; a last partial batch is not timed).
`--rounds N` times every training row N times, in turn (ours, TRL, ours, TRL, ...), and reports each
row's median and each round's ratio (ours against the TRL round run next to it) with their median: on a
shared or throttled machine the speed drifts by 10% and more between minutes, and one pass of ours
followed by one of TRL's reads that drift as a ratio. The
ratio for a `train precompute` row is for a fresh stage: its reference pass plus its training against TRL,
whose reference runs inside its step (a cache hit, training alone, would not be like for like).

Layouts: `plain` is two padded rows per pair (prompt+chosen, prompt+rejected), full logits — the path
before the throughput work; `shared` is `pair_layout`: one row per pair with the prompt computed once,
logits only at completion positions, rows sorted by length and cut where that trims padding; `prefix` is
`prefix_cache`: the same pairs with the prompt computed once through the KV cache instead of a 4D mask
(prompts alone, then chosen and rejected over the cached keys/values: attention ~P^2 + C(P+C) + R(P+R) a
pair rather than (P+C+R)^2), training's default (`training.prefix_cache`). `--trl-compact` runs TRL's fused lm_head over the completion
positions only, as TRL does on CUDA (on CPU it projects every position).

Columns: pairs/s; tokens/s = non-padding tokens of the two sequences of each pair (2P+C+R), the same
count for every layout and for TRL; pad % = computed positions that are padding (`prefix` computes P+C+R-2
real positions a pair: a completion's last token predicts nothing scored); MFU = model FLOPs /
seconds / the matmul peak measured in this run for the same dtype (the best of square matmuls of
several sizes, measured before and after the rows and between rounds; model FLOPs: the work a pair needs
done once — the layers over P+C+R tokens with causal attention, the lm_head at the C+R completion
positions, x3 for forward+backward, + one forward for an online reference — identical for every row,
so MFU ratios are pairs/s ratios); peak MB = the peak resident memory sampled during the row (CPU) or
`torch.cuda.max_memory_allocated` (GPU); on CPU it is the whole process's, models kept for other rows
included, so compare it between rows of one run only.

Torch only (no Ray): runs on a GPU machine with torch + transformers. From the repository root:

    .venv/bin/python benchmarks/throughput.py                                        # stories260K
    .venv/bin/python benchmarks/throughput.py --synthetic-llama 25m --pairs 48 --trl # ~26M Llama vs TRL
    .venv/bin/python benchmarks/throughput.py --synthetic-llama smollm2-135m --pairs 24 --online --trl --trl-compact
    python benchmarks/throughput.py --device cuda --synthetic-llama 85m --pairs 512 --batch 16 --trl

Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_pass import (  # noqa: E402  (the shared setup of the benchmarks)
    _positive,
    _shared,
    add_synthetic_args,
    build_model,
    setup,
    sync,
)

from sdpo.logprobs import collate_pairs  # noqa: E402
from sdpo.pair_layout import chunks, collate_shared  # noqa: E402
from sdpo.prefix_cache import collate_prefix, computed_positions  # noqa: E402
from sdpo.scoring import score_pairs  # noqa: E402
from sdpo.training import LossSettings, autocast, build_optimizer, freeze, pair_losses, slow_bf16  # noqa: E402

LOSS = LossSettings("sigmoid", 0.1, {})
LR = 1e-5
COLLATE = {"plain": collate_pairs, "shared": collate_shared, "prefix": collate_prefix}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=_shared("models/stories260K"))
    add_synthetic_args(p)
    p.add_argument("--data", type=Path, default=_shared("data/ultrafeedback_binarized_1k.jsonl"))
    p.add_argument("--pairs", type=_positive, default=128)
    p.add_argument("--batch", type=_positive, default=8, help="pairs per step (TRL: per_device_train_batch_size)")
    p.add_argument("--max-length", type=_positive, default=512)
    p.add_argument("--max-prompt-length", type=_positive, default=256)
    p.add_argument("--micro-batch", type=_positive, default=32, help="reference pass: pairs per forward")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--layouts", default="plain,shared,prefix")
    p.add_argument("--online", action="store_true", help="reference inside the step (TRL's default) for ours too")
    p.add_argument("--trl", action="store_true", help="also run trl.DPOTrainer (pip install -e '.[bench]')")
    p.add_argument("--trl-checkpointing", type=lambda v: {"on": True, "off": False}[v], default=False,
                   metavar="{on,off}", help="TRL's gradient checkpointing: off (default) as ours; on is TRL's "
                                            "own default (each step recomputes the policy's forward)")
    p.add_argument("--trl-compact", action="store_true",
                   help="TRL's fused LM head over the completion positions only, as TRL runs it on CUDA (on CPU "
                        "it projects every position)")
    p.add_argument("--no-reference-pass", action="store_true",
                   help="no reference-pass rows (with --online the pass is not run at all)")
    p.add_argument("--rounds", type=_positive, default=1,
                   help="time the training rows (ours and TRL's) this many times, in turn; report each row's "
                        "median, every round's ratio and their median")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--threads", type=_positive, default=None)
    args = p.parse_args(argv)
    args.layouts = [x for x in args.layouts.split(",") if x]
    if bad := set(args.layouts) - set(COLLATE):
        p.error(f"--layouts: unknown {sorted(bad)}; choose from {', '.join(COLLATE)}")
    return args


# --------------------------------------------------------------------------------------------------
# FLOPs, peak, memory
# --------------------------------------------------------------------------------------------------
def pair_flops(model, p: int, c: int, r: int) -> float:
    """Forward FLOPs one pair needs, done once: layers over P+C+R tokens, lm_head at C+R positions."""
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    body = sum(t.numel() for n, t in model.named_parameters() if ".layers." in n and t.dim() == 2)
    vocab = model.get_output_embeddings().weight.shape[0]

    def causal(n):
        return n * (n + 1) / 2

    attended = causal(p + c) + causal(p + r) - causal(p)  # (query, key) pairs; the prompt's once
    return 2 * body * (p + c + r) + 2 * d * vocab * (c + r) + 4 * layers * d * attended


def matmul_peak(device, dtype, seconds: float = 1.0) -> float:
    """FLOP/s of the best of repeated square matmuls in `dtype` over several sizes (the machine's practical
    peak: one size, or one busy moment, can read low and would inflate every MFU). About `seconds` a size,
    and at least two timed products each."""
    best = 0.0
    reps = 4 if device.type == "cuda" else 1  # a GPU product is too short to time alone
    for n in (4096, 8192) if device.type == "cuda" else (1024, 2048, 3072):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        t_end, timed = time.perf_counter() + seconds, 0
        while timed < 2 or time.perf_counter() < t_end:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
            timed += 1
        del a, b
    return best


class PeakMemory:
    """Peak resident memory while the block runs: sampled RSS on CPU, the allocator's peak on GPU."""

    def __init__(self, device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        self.mb = self.peak / 2**20


# --------------------------------------------------------------------------------------------------
# Our step, in either layout
# --------------------------------------------------------------------------------------------------
def make_batches(pairs, scores, layout: str, batch_size: int, device) -> tuple[list[dict], list[int]]:
    """Batches as `worker.PairCollate` builds them (already on the device) and each one's computed positions."""
    p, c, r = pairs
    out, positions = [], []
    for s in range(0, len(p), batch_size):
        idx = list(range(s, min(s + batch_size, len(p))))
        args = ([p[i] for i in idx], [c[i] for i in idx], [r[i] for i in idx])
        batch = COLLATE[layout](*args)
        order = batch["order"].tolist() if layout != "plain" else list(range(len(idx)))
        if scores is not None:
            for name in ("chosen_logps", "rejected_logps"):
                batch["ref_" + name] = torch.tensor(scores[name][[idx[o] for o in order]])
            for name in ("chosen_tokens", "rejected_tokens"):
                batch[name] = torch.tensor(scores[name][[idx[o] for o in order]])
        batch = {k: v.to(device) for k, v in batch.items()}
        parts = list(chunks(batch)) if layout != "plain" else [batch]
        positions.append(sum(computed_positions(part) if layout == "prefix" else part["input_ids"].numel()
                             for part in parts))
        out.append(batch)
    return out, positions


def train_step(policy, reference, optimizer, batch, layout: str, bf16: bool, device) -> float:
    """One optimiser step as the worker takes it; returns the batch's mean loss."""
    total, weight = 0.0, float(batch["weights"].sum())
    for part in (chunks(batch) if layout != "plain" else [batch]):
        with autocast(bf16, device):
            losses, _ = pair_losses(policy, reference, part, LOSS)
        (losses * part["weights"] / weight).sum().backward()
        total += float((losses.detach() * part["weights"]).sum())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / weight


def time_training(policy, reference, batches, layout, bf16, device) -> tuple[float, float]:
    """(seconds for one step on each of batches[1:] after a warm-up step on batches[0], the loss of the
    first batch before any update)."""
    policy.train()
    optimizer = build_optimizer(policy, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    state = copy.deepcopy(policy.state_dict())
    first = train_step(policy, reference, optimizer, batches[0], layout, bf16, device)  # warm-up
    policy.load_state_dict(state)  # the timed run starts from the same weights (AdamW state is kept)
    sync(device)
    t0 = time.perf_counter()
    for batch in batches[1:]:
        train_step(policy, reference, optimizer, batch, layout, bf16, device)
    sync(device)
    return time.perf_counter() - t0, first


def time_reference_pass(model, pairs, device, micro_batch, layout) -> tuple[float, dict]:
    p, c, r = pairs
    kw = dict(device=device, micro_batch=micro_batch, layout=layout)
    score_pairs(model, p[:micro_batch], c[:micro_batch], r[:micro_batch], **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    scores = score_pairs(model, p, c, r, **kw)
    sync(device)
    return time.perf_counter() - t0, scores


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    device, tok, pairs, skipped = setup(args)
    b = args.batch
    steps = len(pairs[0]) // b
    if (args.layouts or args.trl) and steps < 2:
        raise SystemExit(f"--pairs {args.pairs} ({len(pairs[0])} usable) gives {steps} batch of {b}: training rows "
                         "need two (the first is the warm-up); raise --pairs or lower --batch")
    pairs = tuple(x[:steps * b] for x in pairs)  # whole batches: ours and TRL's time the same ones
    n = len(pairs[0])
    lengths = [(len(a), len(c), len(r)) for a, c, r in zip(*pairs, strict=True)]
    probe = build_model(args, tok, torch.float32, device)
    fwd = [pair_flops(probe, *x) for x in lengths]
    n_params = sum(t.numel() for t in probe.parameters())
    n_vocab = probe.get_output_embeddings().weight.shape[0]
    del probe
    both = [2 * p + c + r for p, c, r in lengths]  # the two sequences' tokens: every row's token count
    real = {"plain": both, "shared": [p + c + r for p, c, r in lengths],
            "prefix": [p + c + r - 2 for p, c, r in lengths]}  # positions a layout must compute

    rows, pass_seconds, peaks = [], {}, {}
    trl_info = None
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    fix = "its bf16 rows measure that fallback; --precision fp32 leaves them out"
    if "bf16" in precisions and (slow := slow_bf16(device, "--precision", fix)):
        print(slow, flush=True)
    for precision in precisions:
        bf16 = precision == "bf16"
        peaks[precision] = matmul_peak(device, dtypes[precision])
        # the reference: the model with seeded noise, so the first-batch loss is not the trivial ln 2
        torch.manual_seed(1)
        reference = build_model(args, tok, torch.float32, device)
        with torch.no_grad():
            for t in reference.parameters():
                t.add_(0.01 * torch.randn_like(t))
        freeze(reference)
        scores = {}
        for layout in [] if args.online and args.no_reference_pass else args.layouts or ["shared"]:
            # as the pipeline's pass (plan.plan_scoring): the training's numerics, the training's layout
            with PeakMemory(device) as mem, autocast(bf16, device):
                seconds, scores[layout] = time_reference_pass(reference, pairs, device, args.micro_batch, layout)
            pass_seconds[precision, layout] = seconds
            if not args.no_reference_pass:
                rows.append(dict(what=f"reference pass, {layout}", dtype=precision, precision=precision,
                                 seconds=seconds, pairs=n, tokens=sum(both), flops=sum(fwd), mb=mem.mb, pad=None))
        timed: dict[str, list[dict]] = {}  # a training row's rounds, in order
        for rnd in range(args.rounds):
            if rnd:  # one more look at the peak between rounds: the best reading is the least busy one
                peaks[precision] = max(peaks[precision], matmul_peak(device, dtypes[precision]))
            for layout in args.layouts:
                batches, positions = make_batches(pairs, None if args.online else scores[layout], layout, b, device)
                policy = build_model(args, tok, torch.float32, device)
                with PeakMemory(device) as mem:
                    seconds, first = time_training(policy, reference if args.online else None, batches, layout,
                                                   bf16, device)
                row = dict(what=f"train {'online' if args.online else 'precompute'}, {layout}", dtype=precision,
                           precision=precision + (" autocast" if bf16 else ""), seconds=seconds, pairs=n - b,
                           tokens=sum(both[b:]), flops=sum(fwd[b:]) * (4 if args.online else 3), mb=mem.mb,
                           pad=100 * (1 - sum(real[layout][b:]) / sum(positions[1:])), first=first,
                           layout=layout, online=args.online)
                timed.setdefault(row["what"], []).append(row)
                del policy, batches
            if args.trl:
                row, trl_info = run_trl(args, tok, pairs, reference, bf16, device, precision, fwd)
                timed.setdefault(row["what"], []).append(row)
        rows += [merge_rounds(rs) for rs in timed.values()]
    for precision in precisions:  # a second look: the peak is the best of both
        peaks[precision] = max(peaks[precision], matmul_peak(device, dtypes[precision]))

    print_report(args, device, n, skipped, n_params, n_vocab, pairs, rows, peaks, pass_seconds, trl_info)


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a row's rounds: their median seconds, the highest peak memory; `rounds` keeps every
    round's seconds."""
    seconds = [r["seconds"] for r in rounds]
    return rounds[0] | {"seconds": statistics.median(seconds), "mb": max(r["mb"] for r in rounds), "rounds": seconds}


def run_trl(args, tok, pairs, reference, bf16, device, precision, fwd) -> tuple[dict, dict]:
    """TRL's training row and its run's details."""
    try:
        from trl_dpo import run_trl_dpo
    except ModuleNotFoundError as err:
        raise SystemExit(f"--trl needs TRL: pip install -e '.[bench]' ({err})") from None
    p, c, r = pairs
    b = args.batch
    records = [dict(prompt_ids=a, chosen_ids=x, rejected_ids=y) for a, x, y in zip(p, c, r, strict=True)]
    policy = build_model(args, tok, torch.float32, device)
    with PeakMemory(device) as mem:
        # TRL's own warm-up step takes the first batch; the timed steps are the rest, as ours
        out = run_trl_dpo(policy, copy.deepcopy(reference), records, batch_size=b, steps=len(records) // b - 1,
                          beta=LOSS.beta, lr=LR, precision="bf16" if bf16 else "fp32", pad_id=tok.pad_token_id or 0,
                          device=device.type, gradient_checkpointing=args.trl_checkpointing,
                          compact_lm_head=args.trl_compact)
    if out["pairs"] != len(records) - b or not out["uses_given_reference"]:
        raise SystemExit(f"TRL timed {out['pairs']} pairs (expected {len(records) - b}); used the given reference: "
                         f"{out['uses_given_reference']}")
    changed = [f"checkpointing {'on, its default' if args.trl_checkpointing else 'off as ours'}"]
    changed += ["compact head"] if args.trl_compact else []
    return dict(what=f"TRL DPOTrainer ({', '.join(changed)})", dtype=precision,
                precision="bf16 autocast" if bf16 else "fp32", seconds=out["seconds"], pairs=out["pairs"],
                tokens=out["tokens"], flops=sum(fwd[b:]) * 4, mb=mem.mb, pad=None,
                first=out["first_batch_loss"]), out


def print_report(args, device, n, skipped, n_params, n_vocab, pairs, rows, peaks, pass_seconds, trl_info) -> None:
    import transformers

    p, c, r = pairs
    mean = lambda xs: sum(map(len, xs)) / len(xs)  # noqa: E731
    what = f"synthetic Llama {args.synthetic_llama}" if args.synthetic_llama else args.model.name
    what += f" (vocab {n_vocab})"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}"
          + (f", trl {trl_info['trl_version']}" if trl_info else ""))
    print(f"device {device.type} ({name}), {torch.get_num_threads()} threads; model {what}, {n_params / 1e6:.2f}M params")
    print(f"data {args.data.name}: {n} pairs ({skipped} skipped); mean tokens prompt {mean(p):.0f}, chosen "
          f"{mean(c):.0f}, rejected {mean(r):.0f}; batch {args.batch} pairs, lr {LR}, beta {LOSS.beta}; "
          f"training rows timed on pairs {args.batch + 1}-{n} after a warm-up on the first batch"
          + (f"; {args.rounds} rounds, ours and TRL's in turn: each row's median" if args.rounds > 1 else ""))
    head = (f"{'':<44} {'precision':<13} {'pairs/s':>8} {'tokens/s':>9} {'pad %':>6} {'MFU %':>6} "
            f"{'peak MB':>8} {'1st loss':>9}")
    print(head)
    print("-" * len(head))
    for row in rows:
        pad = f"{row['pad']:.1f}" if row["pad"] is not None else "-"
        first = f"{row['first']:.5f}" if "first" in row else "-"
        mfu = 100 * row["flops"] / row["seconds"] / peaks[row["dtype"]]
        print(f"{row['what']:<44} {row['precision']:<13} {row['pairs'] / row['seconds']:>8.2f} "
              f"{row['tokens'] / row['seconds']:>9.0f} {pad:>6} {mfu:>6.1f} {row['mb']:>8.0f} {first:>9}")
    disagree = []
    for precision in peaks:
        same = [row for row in rows if row["dtype"] == precision]
        trl = next((row for row in same if row["what"].startswith("TRL")), None)
        if trl is None:
            continue
        trl_s = trl["seconds"] / trl["pairs"]  # seconds a pair
        # fp32: the same numbers up to summation order; bf16 autocast: to bf16 rounding (2% of the loss)
        tol = 1e-4 if precision == "fp32" else 2e-2 * abs(trl["first"])
        if not abs(trl["first"] - math.log(2)) > 5 * tol:
            disagree.append(f"{precision}: TRL's first loss {trl['first']:.6f} is at ln 2, so it checks nothing")
        for row in same:
            if not row["what"].startswith("train"):
                continue
            ours_s = row["seconds"] / row["pairs"]
            if row["online"]:
                # round i of ours against round i of TRL's, run next to it (one round: the rows' ratio)
                each = [(t / trl["pairs"]) / (o / row["pairs"]) for o, t in zip(row["rounds"], trl["rounds"],
                                                                               strict=True)]
                ratio = f"{statistics.median(each):.2f}x TRL's pairs/s"
                if len(each) > 1:
                    ratio += f" (the rounds' median ratio; each round {', '.join(f'{x:.2f}x' for x in each)})"
            else:  # a fresh stage: its reference pass, then its training
                stage_s = ours_s + pass_seconds[precision, row["layout"]] / n
                ratio = f"{trl_s / stage_s:.2f}x TRL's pairs/s as a fresh stage (its reference pass, then training)"
            diff = abs(row["first"] - trl["first"])
            ok = diff <= tol  # False for a NaN on either side
            if not ok:
                disagree.append(f"{precision} {row['what']}")
            print(f"{precision}: {row['what']} is {ratio}; first-batch loss {row['first']:.6f} vs TRL "
                  f"{trl['first']:.6f} (|diff| {diff:.2e}, tolerance {tol:.0e}: {'agree' if ok else 'DISAGREE'})")
    print("matmul peak (FLOP/s, best of several sizes before and after the rows"
          + (", and between rounds" if args.rounds > 1 else "") + "): "
          + ", ".join(f"{k} {v:.3g}" for k, v in peaks.items()))
    if disagree:
        raise SystemExit(f"first-batch loss check failed: {'; '.join(disagree)}")


if __name__ == "__main__":
    main()
