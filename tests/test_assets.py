"""The offline quickstart assets: loadable, covered by the vocabulary, well-formed, cached, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo.assets import ASSETS_VERSION, build_quickstart_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("qs"))


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.model_dir)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(row: dict, eos: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text; conversational rows are rendered like the fallback template."""
    if isinstance(row["prompt"], str):
        return row["prompt"], row["chosen"], row["rejected"]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in row["prompt"]) + "assistant:"
    return prompt, f" {row['chosen'][0]['content']}{eos}\n", f" {row['rejected'][0]['content']}{eos}\n"


def test_layout(assets):
    root = assets.model_dir.parent
    assert (root / "ASSETS_VERSION").read_text().strip() == ASSETS_VERSION
    assert set(assets.sources) == {"easy", "hard"}
    assert all(p.is_file() and p.parent == root / "data" for p in assets.sources.values())


def test_model_and_tokenizer_load(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (64, 2, 2)
    assert not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert not getattr(tokenizer, "chat_template", None)  # the project supplies the fallback
    ids = tokenizer("user: hello\nassistant:")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("hello")
    ]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_formats(assets):
    easy, hard = _rows(assets.sources["easy"]), _rows(assets.sources["hard"])
    assert len(easy) >= 500 and len(hard) >= 500
    for row in easy:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    for row in hard:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(row[k], str) and row[k] for k in row)


@pytest.mark.parametrize("source", ["easy", "hard"])
def test_pairs_tokenise_cleanly(assets, tokenizer, source):
    for row in _rows(assets.sources[source]):
        prompt, chosen, rejected = _texts(row, tokenizer.eos_token)
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in p_ids + c_ids + r_ids, row
        assert row["chosen"] != row["rejected"] and c_ids != r_ids, row
        assert len(c_ids) == len(r_ids), row  # no winning on length
        assert len(p_ids) + len(c_ids) + 1 < 40  # + 1: a standard completion's EOS


def test_idempotent_and_force(tmp_path):
    assets = build_quickstart_assets(tmp_path)
    files = [assets.model_dir / "model.safetensors", *assets.sources.values(), tmp_path / "ASSETS_VERSION"]
    before = [f.stat().st_mtime_ns for f in files]
    assert build_quickstart_assets(tmp_path) == assets
    assert [f.stat().st_mtime_ns for f in files] == before
    # A build that died before writing the marker is redone.
    (tmp_path / "ASSETS_VERSION").unlink()
    assets.sources["easy"].write_text("half written")
    build_quickstart_assets(tmp_path)
    assert assets.sources["easy"].read_text().startswith("{")
    # force=True rebuilds even a cache that looks complete.
    good = assets.sources["hard"].read_bytes()
    assets.sources["hard"].write_text("edited")
    assert build_quickstart_assets(tmp_path).sources["hard"].read_text() == "edited"
    build_quickstart_assets(tmp_path, force=True)
    assert assets.sources["hard"].read_bytes() == good


def test_deterministic(tmp_path):
    a = build_quickstart_assets(tmp_path / "a")
    torch.manual_seed(123)  # the caller's RNG state must neither matter nor be disturbed
    state = torch.random.get_rng_state()
    b = build_quickstart_assets(tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in a.sources:
        assert a.sources[name].read_bytes() == b.sources[name].read_bytes()
    for fname in ("tokenizer.json", "config.json"):
        assert (a.model_dir / fname).read_bytes() == (b.model_dir / fname).read_bytes()
    sd_a = AutoModelForCausalLM.from_pretrained(a.model_dir).state_dict()
    sd_b = AutoModelForCausalLM.from_pretrained(b.model_dir).state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
