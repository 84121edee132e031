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
- ``hard`` (TRL standard format): "which is larger : 17 or 4 ?"; chosen answers with the larger
  number, rejected with the smaller one. Both answers come from the prompt, so nothing but an order
  on the 40 number tokens ranks them, and it has to be pieced together from pairwise comparisons:
  slower to learn, but it carries over to held-out pairs of numbers.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ASSETS_VERSION = "1"
SEED = 6  # any seed works (checked: 5 seeds); this one starts both sources near chance
N_PAIRS = {"easy": 600, "hard": 1200}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# The fallback chat template renders "{role}: {content}\n" (an assistant's content closed by "</s>") and the
# generation prompt "assistant:"; the word-level tokenizer reads "</s>" as the EOS token and drops the newline.
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
# A reply is "{opener} {name} , {body}": 1 + 1 + 1 + 4 tokens whether polite or rude. Openers and bodies
# combine freely, so what is learnt is "polite words beat rude ones", not a handful of memorised strings.
POLITE = (
    "hello hi welcome dear greetings".split(),
    (
        "nice to meet you|glad to see you|what a lovely name|how can i help|it is a pleasure|"
        "you are very welcome"
    ).split("|"),
)
RUDE = (
    "ugh whatever hmph meh bah".split(),
    (
        "you are so boring|go away right now|i do not care|stop bothering me now|nobody asked for you|"
        "what a silly name"
    ).split("|"),
)


# --- hard: answer the larger of two numbers (780 possible pairs; each number is one token). -------
NUMBERS = [str(n) for n in range(40)]
QUESTIONS = ["which is larger : {a} or {b} ?", "pick the larger number : {a} or {b} ?"]


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
    a, b = rng.sample(NUMBERS, 2)
    big, small = (a, b) if int(a) > int(b) else (b, a)
    prompt = rng.choice(QUESTIONS).format(a=a, b=b)
    return {"prompt": prompt, "chosen": f"the answer is {big}", "rejected": f"the answer is {small}"}


def _vocabulary() -> list[str]:
    """Every token any asset uses, in a fixed order: specials, role words, then the rest sorted."""
    texts = GREETINGS + QUESTIONS + ["the answer is"] + [t for s in (POLITE, RUDE) for t in s[0] + s[1]]
    words = {w for t in texts for w in t.split() if "{" not in w} | set(NAMES) | set(NUMBERS)
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
    from transformers.utils import logging as hf_logging

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
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 0.4 MB file
    try:
        model.save_pretrained(model_dir, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_data(sources: dict[str, Path]) -> None:
    makers = {"easy": _easy_pair, "hard": _hard_pair}
    for i, (name, path) in enumerate(sources.items()):
        rng = random.Random(SEED + i)  # one stream per source: resizing one leaves the other as is
        _write_jsonl(path, [makers[name](rng) for _ in range(N_PAIRS[name])])


def _assets(cache_dir: Path) -> QuickstartAssets:
    data_dir = cache_dir / "data"
    return QuickstartAssets(cache_dir / "model", {n: data_dir / f"{n}.jsonl" for n in N_PAIRS})


def _is_complete(cache_dir: Path) -> bool:
    marker = cache_dir / "ASSETS_VERSION"
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == ASSETS_VERSION


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise builders of one cache (several workers on a node may ask for it at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the marker still guards against half-built caches
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_quickstart_assets(cache_dir: str | os.PathLike, *, force: bool = False) -> QuickstartAssets:
    """Build the quickstart model, tokenizer and data under ``cache_dir`` (or reuse a complete build).

    Idempotent: a cache whose ``ASSETS_VERSION`` marker holds the current version is returned as is;
    ``force=True`` rebuilds it. The marker is written last, so an interrupted build is redone.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    assets = _assets(cache_dir)
    if _is_complete(cache_dir) and not force:
        return assets
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        if _is_complete(cache_dir) and not force:  # another process finished it while we waited
            return assets
        # Invalidate first: a crash from here on leaves a cache that is rebuilt on the next call.
        (cache_dir / "ASSETS_VERSION").unlink(missing_ok=True)
        for sub in (assets.model_dir, cache_dir / "data"):
            shutil.rmtree(sub, ignore_errors=True)
            sub.mkdir(parents=True)
        tokenizer = _build_tokenizer(assets.model_dir)
        _build_model(assets.model_dir, tokenizer)
        _build_data(assets.sources)
        (cache_dir / "ASSETS_VERSION").write_text(ASSETS_VERSION + "\n", encoding="utf-8")
    return assets
