"""Benchmark: the reference pass's speed against training's, on the same model, pairs and data.

`reference.mode: precompute` runs one inference pass of the frozen reference over every pair
(`scoring.score_pairs`: length-sorted micro-batches, `inference_mode`, bf16 weights where asked), then
trains with those log-probs as batch columns; `mode: online` instead runs the reference forward inside
every training step. This script measures, for one model and one set of pairs:

1. reference pass    — `score_pairs(..., micro_batch=--micro-batch)` with fp32 and/or bf16 weights;
                       model load excluded, one warm-up call (the largest micro-batch) first.
2. train precompute  — forward+backward+clip+AdamW step of the policy with
                       `pair_losses(policy, None, batch, sigmoid/beta 0.1)`, the `ref_*` columns taken
                       from (1); batches of --train-batch pairs in file order (the pipeline's shuffled
                       order has the same padding statistics); policy in fp32, autocast bf16 when bf16 —
                       as `worker.stage_loop` does. One warm-up step (it allocates the AdamW state) first.
3. train online      — the same step with `reference=` a frozen fp32 copy of the policy.

Throughput is pairs/s and non-padding tokens/s (prompt+chosen and prompt+rejected, EOS included);
`pad %` is the share of computed positions that are padding. `ref/this` = the reference pass's pairs/s
over this row's: how many times faster scoring a pair is than training on it.
Training batches are collated and moved to the device before the clock starts (the pipeline collates
in Ray Data's prefetch threads); `score_pairs` collates inside its own timing.

Torch only — no Ray, so it runs on a GPU machine with torch + transformers (+ numpy, pyarrow, which
`sdpo.scoring` imports). From the repository root:

    .venv/bin/python benchmarks/reference_pass.py                                    # stories260K, 256 pairs
    .venv/bin/python benchmarks/reference_pass.py --synthetic-llama 25m --pairs 64   # ~26M random Llama
    python benchmarks/reference_pass.py --device cuda --synthetic-llama 85m --pairs 1024

Results measured on a 2-core CPU are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import sdpo  # noqa: F401  (installed: pip install -e .)
except ModuleNotFoundError:
    sys.path.insert(0, str(REPO / "platform"))  # a checkout without the install
try:
    from sdpo.head_logps import DEFAULT_MAX_LOGITS_MB, set_max_logits_mb
    from sdpo.logprobs import collate_pairs
    from sdpo.rows import RowError, prepare_record
    from sdpo.scoring import load_model, resolve_precision, score_pairs
    from sdpo.training import LossSettings, autocast, build_optimizer, freeze, pair_losses, scale_gradients
except ModuleNotFoundError as err:
    raise SystemExit(f"reference_pass.py needs the module {err.name!r}: pip install {err.name}") from None

LOSS = LossSettings("sigmoid", 0.1, {})
# Random-init Llama shapes for --synthetic-llama: big enough that matmuls, not Python, dominate. The names
# count the decoder layers' parameters; without `vocab_size` the vocabulary is the tokenizer's (512 for
# stories260K, where the lm_head is ~1% of the forward FLOPs; --vocab sets another).
SYNTHETIC = {
    "25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
    "85m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    # SmolLM2-135M's published shape (grouped-query attention, tied embeddings, a 49152-token vocabulary):
    # a real small model's balance of lm_head, attention and MLP, with random weights.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5),
    # Llama 3.2 1B's shape (its rope scaling left out: it changes no FLOPs): for a GPU, too slow for this CPU.
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        rms_norm_eps=1e-5),
}


def _shared(rel: str) -> Path:
    """`<repo>/../shared/<rel>` (the workspace layout), else `<repo>/shared/<rel>` (a copied checkout)."""
    candidates = [REPO.parent / "shared" / rel, REPO / "shared" / rel]
    return next((p for p in candidates if p.exists()), candidates[0])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_synthetic_args(p: argparse.ArgumentParser) -> None:
    """--synthetic-llama and --vocab, the same in every benchmark."""
    p.add_argument("--synthetic-llama", choices=sorted(SYNTHETIC), default=None,
                   help="benchmark a random-init Llama of this size instead of --model's weights")
    p.add_argument("--vocab", type=_positive, default=None,
                   help="the synthetic Llama's vocabulary (default: the shape's own, else --model's tokenizer: 512 "
                        "for stories260K); 32000 is Llama 2's. The token ids still come from --model's tokenizer")
    p.add_argument("--max-logits-mb", type=_budget, default=DEFAULT_MAX_LOGITS_MB,
                   help="training.max_logits_mb: fp32 MiB of one forward's completion logits above which the "
                        "lm_head runs in slices (default %(default)s; 'none' never slices)")


def _budget(value: str) -> float | None:
    if value.lower() in ("none", "null"):
        return None
    mb = float(value)
    if mb <= 0:
        raise argparse.ArgumentTypeError(f"--max-logits-mb must be > 0 or 'none', got {value}")
    return mb


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=_shared("models/stories260K"),
                   help="HF model directory; its tokenizer is used in every case")
    add_synthetic_args(p)
    p.add_argument("--data", type=Path, default=_shared("data/ultrafeedback_binarized_1k.jsonl"))
    p.add_argument("--pairs", type=_positive, default=256)
    p.add_argument("--max-length", type=_positive, default=512)
    p.add_argument("--max-prompt-length", type=_positive, default=256)
    p.add_argument("--micro-batch", type=_positive, default=32, help="reference pass: pairs per forward")
    p.add_argument("--train-batch", type=_positive, default=8, help="training: pairs per step")
    p.add_argument("--precision", choices=["fp32", "bf16", "both", "auto"], default="both",
                   help="auto: bf16 on a GPU, fp32 on CPU (the pipeline's rule)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (capped at the cores)")
    args = p.parse_args(argv)
    if args.max_prompt_length >= args.max_length:
        p.error(f"--max-prompt-length ({args.max_prompt_length}) must be below --max-length ({args.max_length})")
    for path in (args.model, args.data):
        if not path.exists():
            p.error(f"{path} does not exist")
    return args


# --------------------------------------------------------------------------------------------------
# Setup: device, pairs, models
# --------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 1 << 62  # we truncate ourselves (as ingest.load_tokenizer does)
    if tok.eos_token_id is None:
        raise SystemExit(f"tokenizer {path} has no EOS token; completions need one")
    return tok


def load_pairs(path: Path, tok, n: int, max_length: int, max_prompt_length: int):
    """The first n usable rows, tokenised exactly as ingest does; unusable rows are counted, not used."""
    prompts, chosens, rejecteds, skipped = [], [], [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(prompts) == n:
                break
            if not line.strip():
                continue
            try:
                pair = prepare_record(line, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                      eos_id=tok.eos_token_id)
            except RowError:
                skipped += 1
                continue
            prompts.append(pair.prompt_ids)
            chosens.append(pair.chosen_ids)
            rejecteds.append(pair.rejected_ids)
    if not prompts:
        raise SystemExit(f"{path}: no usable pairs")
    return (prompts, chosens, rejecteds), skipped


def setup(args):
    """Threads, device, tokenizer and pairs from the parsed arguments (shared by the benchmarks)."""
    if args.threads:
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or args.threads)))
    device = pick_device(args.device)
    tok = load_tokenizer(args.model)
    pairs, skipped = load_pairs(args.data, tok, args.pairs, args.max_length, args.max_prompt_length)
    return device, tok, pairs, skipped


def build_model(args, tok, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """--model's weights, or the same seeded random Llama on every call."""
    model = _build_model(args, tok, dtype, device)
    set_max_logits_mb(model, getattr(args, "max_logits_mb", DEFAULT_MAX_LOGITS_MB))
    return model


def _build_model(args, tok, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if args.synthetic_llama is None:
        return load_model(str(args.model), dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    own = SYNTHETIC[args.synthetic_llama]
    shape = {"num_key_value_heads": own["num_attention_heads"], "tie_word_embeddings": False, **own}
    shape["vocab_size"] = synthetic_vocab(args, tok, shape.get("vocab_size"))
    config = LlamaConfig(max_position_embeddings=max(512, args.max_length), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's init takes seconds on a CPU
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def synthetic_vocab(args, tok, default: int | None = None) -> int:
    """--vocab, else the shape's own vocabulary, else the tokenizer's size."""
    vocab = args.vocab or default or len(tok)
    if vocab < len(tok):
        raise SystemExit(f"--vocab {vocab} is below the tokenizer's {len(tok)} ids")
    return vocab


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# The two measurements
# --------------------------------------------------------------------------------------------------
def time_reference_pass(model, pairs, device, micro_batch: int) -> tuple[float, dict, int]:
    """Seconds for one `score_pairs` call over all pairs, its scores, and the positions it computed."""
    p, c, r = pairs
    lengths = np.array([len(a) + max(len(b), len(d)) for a, b, d in zip(p, c, r, strict=True)])
    order = np.argsort(-lengths, kind="stable")  # score_pairs' own micro-batching, to count its padding
    positions = sum(2 * len(idx) * int(lengths[idx].max())
                    for idx in (order[s:s + micro_batch] for s in range(0, len(p), micro_batch)))
    warm = order[:micro_batch]  # the largest micro-batch: kernels chosen, allocator at its peak
    score_pairs(model, [p[i] for i in warm], [c[i] for i in warm], [r[i] for i in warm],
                device=device, micro_batch=micro_batch)
    sync(device)
    t0 = time.perf_counter()
    scores = score_pairs(model, p, c, r, device=device, micro_batch=micro_batch)
    sync(device)
    return time.perf_counter() - t0, scores, positions


def training_batches(pairs, scores: dict, batch_size: int, device) -> list[dict]:
    """Batches as `worker.PairCollate` builds them in precompute mode, already on the device."""
    p, c, r = pairs
    out = []
    for s in range(0, len(p), batch_size):
        idx = list(range(s, min(s + batch_size, len(p))))
        batch = collate_pairs([p[i] for i in idx], [c[i] for i in idx], [r[i] for i in idx])
        for name in ("chosen_logps", "rejected_logps"):
            batch["ref_" + name] = torch.tensor(scores[name][idx])
        for name in ("chosen_tokens", "rejected_tokens"):
            batch[name] = torch.tensor(scores[name][idx])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def time_training(policy, reference, batches: list[dict], device, bf16: bool) -> float:
    """Seconds for one step per batch (after one warm-up step), as `worker.stage_loop` steps."""
    policy.train()
    optimizer = build_optimizer(policy, lr=5e-7, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)

    def step(batch):
        with autocast(bf16, device):
            losses, _ = pair_losses(policy, reference, batch, LOSS)
        (losses * batch["weights"]).sum().backward()
        scale_gradients(policy, 1.0 / float(batch["weights"].sum()))
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def machine_facts(args, device, tok, model, pairs, skipped: int) -> list[str]:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            name = "unknown CPU"
    cfg = model.config
    p, c, r = pairs
    what = f"synthetic Llama {args.synthetic_llama} (random init)" if args.synthetic_llama else str(args.model)
    return [
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"device {device.type}: {name}; CPU threads {torch.get_num_threads()} (cores {os.cpu_count()})",
        f"model {what}: {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M params, hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}",
        f"data {args.data.name}: {len(p)} pairs ({skipped} rows skipped), max_length {args.max_length}, "
        f"max_prompt_length {args.max_prompt_length}; mean tokens prompt {np.mean([len(x) for x in p]):.0f}, "
        f"chosen {np.mean([len(x) for x in c]):.0f}, rejected {np.mean([len(x) for x in r]):.0f}",
        f"reference micro-batch {args.micro_batch} pairs, training batch {args.train_batch} pairs",
    ]


def print_table(rows: list[dict]) -> None:
    head = f"{'mode':<18} {'precision':<13} {'pairs/s':>9} {'tokens/s':>10} {'pad %':>6} {'seconds':>8} {'ref/this':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['mode']:<18} {row['precision']:<13} {row['pairs_s']:>9.2f} {row['tokens_s']:>10.0f} "
              f"{row['pad']:>6.1f} {row['seconds']:>8.2f} {row['ratio']:>8.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device, tok, pairs, skipped = setup(args)
    n = len(pairs[0])
    tokens = sum(2 * len(a) + len(b) + len(d) for a, b, d in zip(*pairs, strict=True))  # non-padding
    on_gpu = device.type == "cuda"
    precisions = ["fp32", "bf16"] if args.precision == "both" else [resolve_precision(args.precision, on_gpu)]

    rows, facts, totals = [], None, []
    for precision in precisions:
        bf16 = precision == "bf16"
        scorer = build_model(args, tok, torch.bfloat16 if bf16 else torch.float32, device).eval()
        facts = facts or machine_facts(args, device, tok, scorer, pairs, skipped)
        seconds, scores, positions = time_reference_pass(scorer, pairs, device, args.micro_batch)
        del scorer
        ref = dict(mode="reference pass", precision=precision, seconds=seconds, pad=100 * (1 - tokens / positions))
        rows.append(ref)
        batches = training_batches(pairs, scores, args.train_batch, device)
        train_positions = sum(b["attention_mask"].numel() for b in batches)
        timed = {}
        for mode in ("train precompute", "train online"):
            policy = build_model(args, tok, torch.float32, device)  # fresh fp32 weights, as the worker loads
            reference = freeze(copy.deepcopy(policy)) if mode == "train online" else None
            timed[mode] = time_training(policy, reference, batches, device, bf16)
            rows.append(dict(mode=mode, precision=precision + (" autocast" if bf16 else ""), seconds=timed[mode],
                             pad=100 * (1 - tokens / train_positions)))
            del policy, reference
        totals.append(f"{precision}: one epoch over {n} pairs — precompute = reference pass {seconds:.2f}s + "
                      f"training {timed['train precompute']:.2f}s = {seconds + timed['train precompute']:.2f}s; "
                      f"online = {timed['train online']:.2f}s")
        for row in rows[-3:]:
            row["pairs_s"], row["tokens_s"] = n / row["seconds"], tokens / row["seconds"]
            row["ratio"] = ref["pairs_s"] / row["pairs_s"]

    print("\n".join(facts))
    print()
    print_table(rows)
    print()
    print("\n".join(totals))


if __name__ == "__main__":
    main()
