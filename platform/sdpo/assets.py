"""Tiny offline quickstart assets: a word-level tokenizer, a random 2-layer Llama and two synthetic
preference sources.

The quickstart must run on a fresh CPU machine with no network, so nothing here is downloaded:
everything is generated from fixed seeds in well under a second, and two builds give byte-identical
data files and identical weights.

The two sources are two task families of different difficulty, so that stepwise DPO has a curriculum
to walk through and the held-out ranking accuracy visibly moves at each step:

- ``easy`` (TRL conversational format): reply to a greeting from a random name; chosen is a polite
  reply, rejected a rude one. The preference is a pattern of words, learnt in a few dozen steps, and
  it carries over to held-out names and prompt/reply combinations.
- ``hard`` (TRL standard format): copy a list of words; chosen is the exact copy, rejected the copy
  with one word swapped for a word that is not in the list. Only the prompt tells which is right, so
  the model has to learn to look back at it.

Chosen and rejected always have the same number of tokens (a model cannot win on length), and every
word is in the tokenizer's vocabulary (no ``<unk>``).

Layout of ``cache_dir``::

    model/            tokenizer + LlamaForCausalLM (safetensors), loadable with Auto*.from_pretrained
    data/easy.jsonl   conversational pairs
    data/hard.jsonl   standard pairs
    ASSETS_VERSION    written last: its presence with the current version means the cache is complete
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

ASSETS_VERSION = "1"
SEED = 1234
N_PAIRS = {"easy": 600, "hard": 1200}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# The fallback chat template renders "{role}: {content}\n" and the generation prompt "assistant: ".
ROLE_WORDS = ["system", "user", "assistant", ":"]

# --- easy: greetings. Texts are space-separated tokens, so word count == token count. -------------
NAMES = (
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Karl Lena Mallory Nina Oscar Peggy Quinn "
    "Rupert Sybil Trent Ursula Victor Wendy Xavier Yara Zoe Amir Bea Chen Dara Emil Fay Gus Hana Igor "
    "Jin Kofi Lars Mei Nils"
).split()
GREETINGS = [
    "hello , my name is {name} .",
    "hi , i am {name} .",
    "good morning , this is {name} .",
    "hey there , {name} here .",
    "greetings , i am called {name} .",
]
# A reply is "{opener} {name} , {body}": 1 + 1 + 1 + 4 tokens whether polite or rude. Many openers and
# bodies, so an untrained model's preference averages out near chance instead of hinging on one template.
POLITE = (
    ["hello", "hi", "welcome", "dear", "greetings"],
    ["nice to meet you", "glad to see you", "what a lovely name", "how can i help",
     "it is a pleasure", "you are very welcome"],
)
RUDE = (
    ["ugh", "whatever", "hmph", "meh", "bah"],
    ["you are so boring", "go away right now", "i do not care", "stop bothering me now",
     "nobody asked for you", "what a silly name"],
)


# --- hard: compare two numbers. -------------------------------------------------------------------
NUMBERS = [str(n) for n in range(40)]
QUESTIONS = ["which is {op} : {a} or {b} ?", "pick the {op} number : {a} or {b} ?"]
OPS = ("larger", "smaller")


@dataclass(frozen=True)
class QuickstartAssets:
    model_dir: Path
    sources: dict[str, Path]  # source name -> JSONL file


def _reply(rng: random.Random, style: tuple[list[str], list[str]], name: str) -> str:
    openers, bodies = style
    return f"{rng.choice(openers)} {name} , {rng.choice(bodies)}"


def _easy_pair(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    return {
        "prompt": [{"role": "user", "content": rng.choice(GREETINGS).format(name=name)}],
        "chosen": [{"role": "assistant", "content": _reply(rng, POLITE, name)}],
        "rejected": [{"role": "assistant", "content": _reply(rng, RUDE, name)}],
    }


def _hard_pair(rng: random.Random) -> dict:
    a, b = rng.sample(range(len(NUMBERS)), 2)
    op = rng.choice(OPS)
    right, wrong = (max(a, b), min(a, b)) if op == "larger" else (min(a, b), max(a, b))
    prompt = rng.choice(QUESTIONS).format(op=op, a=a, b=b)
    return {"prompt": prompt, "chosen": f"the answer is {right}", "rejected": f"the answer is {wrong}"}


def _vocabulary() -> list[str]:
    """Every token any asset uses, in a fixed order: specials, role words, then the rest sorted."""
    texts = GREETINGS + [t for style in (POLITE, RUDE) for t in style[0] + style[1]] + QUESTIONS + ["the answer is"]
    words = {w for t in texts for w in t.format(name="", op="", a="", b="").split()} | set(NAMES) | set(NUMBERS) | set(OPS)
    fixed = SPECIAL_TOKENS + ROLE_WORDS
    return fixed + sorted(words - set(fixed))


def _build_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "user:" into "user", ":"
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces on decode
    # Single sequences get a BOS; pairs are not used by the project but need a template too.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(model_dir)
    return fast


def _build_model(model_dir: Path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seed the init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def _build_data(data_dir: Path) -> dict[str, Path]:
    makers = {"easy": _easy_pair, "hard": _hard_pair}
    paths = {}
    for i, (name, make) in enumerate(makers.items()):
        rng = random.Random(SEED + i)  # one stream per source: resizing one leaves the other as is
        paths[name] = data_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], [make(rng) for _ in range(N_PAIRS[name])])
    return paths


def _assets(cache_dir: Path) -> QuickstartAssets:
    data_dir = cache_dir / "data"
    return QuickstartAssets(cache_dir / "model", {n: data_dir / f"{n}.jsonl" for n in N_PAIRS})


def _is_complete(cache_dir: Path) -> bool:
    marker = cache_dir / "ASSETS_VERSION"
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == ASSETS_VERSION


def build_quickstart_assets(cache_dir: str | os.PathLike, *, force: bool = False) -> QuickstartAssets:
    """Build the quickstart model, tokenizer and data under ``cache_dir`` (or reuse a complete build).

    Idempotent: a cache whose ``ASSETS_VERSION`` marker holds the current version is returned as is;
    ``force=True`` rebuilds it. The marker is written last, so an interrupted build is redone.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    assets = _assets(cache_dir)
    if _is_complete(cache_dir) and not force:
        return assets
    # Invalidate first: a crash from here on leaves a cache that is rebuilt on the next call.
    (cache_dir / "ASSETS_VERSION").unlink(missing_ok=True)
    for sub in (assets.model_dir, cache_dir / "data"):
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
    tokenizer = _build_tokenizer(assets.model_dir)
    _build_model(assets.model_dir, tokenizer)
    _build_data(cache_dir / "data")
    (cache_dir / "ASSETS_VERSION").write_text(ASSETS_VERSION + "\n", encoding="utf-8")
    return assets
