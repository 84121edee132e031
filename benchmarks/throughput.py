"""Benchmark: training-stage and reference-pass throughput, ours (plain and fast layouts) against TRL.

For one model and one set of real pairs it times, after a warm-up step each:

  train          forward+backward+clip+AdamW of the policy, exactly as `worker.stage_loop` steps:
                 `reference.mode: precompute` (reference log-probs as batch columns), or `--online`
                 (the frozen reference run inside the step, as TRL's DPOTrainer does by default);
  reference pass `scoring.score_pairs`, the cached pass before every stage (inference only);
  TRL            (`--trl`, the `bench` extra) `trl.DPOTrainer` on the same tokens, model, batch, precision,
                 loss (sigmoid, beta 0.1), lr and order, reference online — with the ratio ours/TRL and
                 both first-batch losses, which must agree.

Layouts: `plain` is two padded rows per pair (prompt+chosen, prompt+rejected), full logits — the path
before the throughput work; `shared` is `pair_layout`: one row per pair with the prompt computed once,
logits only at completion positions, rows sorted by length and cut where that trims padding; `prefix` is
`prefix_cache`: the same pairs with the prompt computed once through the KV cache instead of a 4D mask
(prompts alone, then chosen and rejected over the cached keys/values: attention ~P^2 + C(P+C) + R(P+R) a
pair rather than (P+C+R)^2), training's default (`training.prefix_cache`). The reference pass has no prefix
variant: `prefix` alone times the shared one. `--trl-compact` runs TRL's fused lm_head over the completion
positions only, as TRL does on CUDA (on CPU it projects every position).

Columns: pairs/s; tokens/s = non-padding tokens of the two sequences of each pair (2P+C+R), the same
count for every layout and for TRL; pad % = computed positions that are padding (`prefix` computes P+C+R-2
real positions a pair: a completion's last token predicts nothing scored); MFU = model FLOPs /
seconds / the matmul peak measured in this run for the same dtype (model FLOPs: the work a pair needs
done once — the layers over P+C+R tokens with causal attention, the lm_head at the C+R completion
positions, x3 for forward+backward, + one forward for an online reference — identical for every row,
so MFU ratios are pairs/s ratios); peak MB = the peak resident memory sampled during the row (CPU) or
`torch.cuda.max_memory_allocated` (GPU).

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
import os
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
from sdpo.training import LossSettings, autocast, build_optimizer, freeze, pair_losses  # noqa: E402

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
    p.add_argument("--trl-checkpointing", type=lambda v: {"on": True, "off": False}[v], default=None,
                   metavar="{on,off}", help="TRL's gradient checkpointing (default: TRL's own, on)")
    p.add_argument("--trl-compact", action="store_true",
                   help="TRL's fused LM head over the completion positions only, as TRL runs it on CUDA (on CPU "
                        "it projects every position)")
    p.add_argument("--no-reference-pass", action="store_true")
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


def matmul_peak(device, dtype, seconds: float = 2.0) -> float:
    """FLOP/s of the best of repeated square matmuls in `dtype` (the machine's practical peak)."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    a @ b
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
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
def make_batches(pairs, scores, layout: str, batch_size: int, device) -> tuple[list[dict], int]:
    """Batches as `worker.PairCollate` builds them (already on the device) and their computed positions."""
    p, c, r = pairs
    out, positions = [], 0
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
        positions += sum(computed_positions(part) if layout == "prefix" else part["input_ids"].numel()
                         for part in parts)
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
    """(seconds for one step per batch after a warm-up step, loss of the first batch before any update)."""
    policy.train()
    optimizer = build_optimizer(policy, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    state = copy.deepcopy(policy.state_dict())
    first = train_step(policy, reference, optimizer, batches[0], layout, bf16, device)  # warm-up
    policy.load_state_dict(state)  # the timed run starts from the same weights (AdamW state is kept)
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        train_step(policy, reference, optimizer, batch, layout, bf16, device)
    sync(device)
    return time.perf_counter() - t0, first


def time_reference_pass(model, pairs, device, micro_batch, layout) -> tuple[float, dict]:
    p, c, r = pairs
    kw = dict(device=device, micro_batch=micro_batch, shared_prompt=layout == "shared")
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
    n = len(pairs[0])
    tokens = sum(2 * len(a) + len(b) + len(d) for a, b, d in zip(*pairs, strict=True))
    unique = sum(len(a) + len(b) + len(d) for a, b, d in zip(*pairs, strict=True))
    probe = build_model(args, tok, torch.float32, device)
    fwd = sum(pair_flops(probe, len(a), len(b), len(d)) for a, b, d in zip(*pairs, strict=True))
    n_params = sum(t.numel() for t in probe.parameters())
    n_vocab = probe.get_output_embeddings().weight.shape[0]
    del probe

    rows = []
    trl_info = None
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for precision in precisions:
        bf16 = precision == "bf16"
        peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
        # the reference: the model with seeded noise, so the first-batch loss is not the trivial ln 2
        torch.manual_seed(1)
        reference = build_model(args, tok, torch.float32, device)
        with torch.no_grad():
            for t in reference.parameters():
                t.add_(0.01 * torch.randn_like(t))
        freeze(reference)
        scores = None
        for layout in [x for x in args.layouts if x != "prefix"] or ["shared"]:
            scorer = copy.deepcopy(reference).to(torch.bfloat16 if bf16 else torch.float32)
            with PeakMemory(device) as mem:
                seconds, layout_scores = time_reference_pass(scorer, pairs, device, args.micro_batch, layout)
            scores = scores or layout_scores
            del scorer
            if not args.no_reference_pass:
                rows.append(dict(what=f"reference pass, {layout}", precision=precision, seconds=seconds,
                                 flops=fwd, peak=peak, mb=mem.mb, pad=None))
        for layout in args.layouts:
            batches, positions = make_batches(pairs, None if args.online else scores, layout, args.batch, device)
            real = {"plain": tokens, "shared": unique, "prefix": unique - 2 * n}[layout]
            policy = build_model(args, tok, torch.float32, device)
            with PeakMemory(device) as mem:
                seconds, first = time_training(policy, reference if args.online else None, batches, layout, bf16,
                                               device)
            rows.append(dict(what=f"train {'online' if args.online else 'precompute'}, {layout}",
                             precision=precision + (" autocast" if bf16 else ""), seconds=seconds,
                             flops=fwd * (4 if args.online else 3), peak=peak, mb=mem.mb,
                             pad=100 * (1 - real / positions), first=first))
            del policy, batches
        if args.trl:
            trl_info = run_trl(args, tok, pairs, reference, bf16, device, peak, fwd, rows) or trl_info

    print_report(args, device, tok, n, skipped, n_params, n_vocab, pairs, rows, tokens, trl_info)


def run_trl(args, tok, pairs, reference, bf16, device, peak, fwd, rows) -> dict | None:
    try:
        from trl_dpo import run_trl_dpo
    except ModuleNotFoundError as err:
        raise SystemExit(f"--trl needs TRL: pip install -e '.[bench]' ({err})") from None
    p, c, r = pairs
    records = [dict(prompt_ids=a, chosen_ids=b, rejected_ids=d) for a, b, d in zip(p, c, r, strict=True)]
    policy = build_model(args, tok, torch.float32, device)
    with PeakMemory(device) as mem:
        # TRL's own warm-up step takes the first batch; the timed steps are the rest
        out = run_trl_dpo(policy, copy.deepcopy(reference), records, batch_size=args.batch,
                          steps=max(1, len(records) // args.batch - 1), beta=LOSS.beta, lr=LR,
                          precision="bf16" if bf16 else "fp32", pad_id=tok.pad_token_id or 0,
                          device=device.type, gradient_checkpointing=args.trl_checkpointing,
                          compact_lm_head=args.trl_compact)
    changed = [] if args.trl_checkpointing is None else [f"checkpointing {'on' if args.trl_checkpointing else 'off'}"]
    changed += ["compact head"] if args.trl_compact else []
    rows.append(dict(what=f"TRL DPOTrainer ({', '.join(changed) or 'stock'})", precision="bf16 autocast" if bf16 else "fp32",
                     seconds=len(records) / out["pairs_s"], flops=fwd * 4, peak=peak, mb=mem.mb, pad=None,
                     first=out["first_batch_loss"]))
    return out


def print_report(args, device, tok, n, skipped, n_params, n_vocab, pairs, rows, tokens, trl_info) -> None:
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
          f"{mean(c):.0f}, rejected {mean(r):.0f}; batch {args.batch} pairs, lr {LR}, beta {LOSS.beta}")
    head = (f"{'':<38} {'precision':<13} {'pairs/s':>8} {'tokens/s':>9} {'pad %':>6} {'MFU %':>6} "
            f"{'peak MB':>8} {'1st loss':>9}")
    print(head)
    print("-" * len(head))
    for row in rows:
        pad = f"{row['pad']:.1f}" if row["pad"] is not None else "-"
        first = f"{row['first']:.5f}" if "first" in row else "-"
        mfu = 100 * row["flops"] / row["seconds"] / row["peak"]
        print(f"{row['what']:<38} {row['precision']:<13} {n / row['seconds']:>8.2f} {tokens / row['seconds']:>9.0f} "
              f"{pad:>6} {mfu:>6.1f} {row['mb']:>8.0f} {first:>9}")
    disagree = []
    for precision in sorted({row["precision"] for row in rows}):
        same = [row for row in rows if row["precision"] == precision]
        trl = [row for row in same if row["what"].startswith("TRL")]
        # fp32: the same numbers up to summation order; bf16 autocast: to bf16 rounding (2% of the loss)
        tol = 1e-4 if precision == "fp32" else 2e-2 * abs(trl[0]["first"]) if trl else 0.0
        for row in same:
            if trl and row["what"].startswith("train"):
                diff = abs(row["first"] - trl[0]["first"])
                verdict = "agree" if diff <= tol else "DISAGREE"
                if diff > tol:
                    disagree.append(f"{precision} {row['what']}")
                print(f"{precision}: {row['what']} is {trl[0]['seconds'] / row['seconds']:.2f}x TRL's pairs/s; "
                      f"first-batch loss {row['first']:.6f} vs TRL {trl[0]['first']:.6f} "
                      f"(|diff| {diff:.2e}, tolerance {tol:.0e}: {verdict})")
    print("matmul peak (FLOP/s): " + ", ".join(sorted({f"{row['precision'].split()[0]} {row['peak']:.3g}"
                                                       for row in rows})))
    if disagree:
        raise SystemExit(f"first-batch loss differs from TRL's beyond tolerance: {', '.join(disagree)}")


if __name__ == "__main__":
    main()
