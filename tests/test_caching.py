"""Content addresses of scoring passes: each input of a pass changes its key, nothing else does."""

import hashlib
import json
import os
import shutil
import struct
import uuid

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdpo import caching
from sdpo.caching import (
    MARKER,
    CacheEntry,
    clear,
    content_key,
    entry_path,
    model_digest,
    multiset_digest,
    pass_key,
    position_keys,
    read_marker,
    write_marker,
)

PAIR = ([1, 2, 3], [4, 5], [6])


# --------------------------------------------------------------------------------------------------
# content_key
# --------------------------------------------------------------------------------------------------
def test_content_key_layout_and_pinned_value():
    """The key is blake2b-64 over, for prompt, chosen, rejected in turn: a u32 little-endian length, then
    the ids as int32 little-endian; the digest read little-endian and shifted right 1 bit (63 bits).
    Pinned: a changed layout silently invalidates every cache entry, so it must be a visible change."""
    h = hashlib.blake2b(digest_size=8)
    for ids in PAIR:
        h.update(struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}i", *ids))
    expected = int.from_bytes(h.digest(), "little") >> 1
    assert content_key(*PAIR) == expected == 7726959267739929169


def test_content_key_any_iterable_gives_the_same_key():
    """Lists, tuples, int64 arrays and generators of the same ids are the same content."""
    ref = content_key(*PAIR)
    assert content_key(*(tuple(x) for x in PAIR)) == ref
    assert content_key(*(np.asarray(x, np.int64) for x in PAIR)) == ref
    assert content_key(*(iter(x) for x in PAIR)) == ref
    assert content_key(*PAIR) == ref  # deterministic within the process


def test_content_key_of_rows_with_rewards_or_responses():
    """A plain pair keeps its pinned key (empty responses/rewards add nothing); rewards, a response
    or the order of responses are content: each changes the key."""
    ref = content_key(*PAIR)
    assert content_key(*PAIR, responses=[], rewards=[]) == ref
    scored = content_key(*PAIR, rewards=[8.0, 3.0])
    group = content_key(*PAIR, responses=[PAIR[1], PAIR[2], [9]], rewards=[8.0, 3.0, 1.0])
    variants = [
        scored, content_key(*PAIR, rewards=[8.0, 3.5]), group,
        content_key(*PAIR, responses=[PAIR[1], PAIR[2], [9]], rewards=[8.0, 3.0, 0.5]),
        content_key(*PAIR, responses=[PAIR[2], PAIR[1], [9]], rewards=[8.0, 3.0, 1.0]),
        content_key(*PAIR, responses=[PAIR[1], PAIR[2], [9, 9]], rewards=[8.0, 3.0, 1.0]),
    ]
    assert len({ref, *variants}) == 1 + len(variants)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_content_key_changes_with_any_token(part):
    """Changing, appending or dropping one token of prompt, chosen or rejected changes the key."""
    ref = content_key(*PAIR)
    for change in (lambda ids: [ids[0] + 1, *ids[1:]], lambda ids: [*ids[:-1], ids[-1] + 1000],
                   lambda ids: [*ids, 0], lambda ids: ids[:-1]):
        pair = list(PAIR)
        pair[part] = change(pair[part])
        assert content_key(*pair) != ref, (part, pair)


@pytest.mark.parametrize("a, b", [
    (([1, 2], [3], [4]), ([1], [2, 3], [4])),  # a token moves from prompt to chosen
    (([1], [2, 3], [4]), ([1], [2], [3, 4])),  # ... from chosen to rejected
    (([1], [2], []), ([1], [], [2])),  # the same token as chosen vs as rejected
    (([1], [2], [3]), ([1], [3], [2])),  # chosen and rejected swapped
    (([], [1, 2], [3]), ([1, 2], [], [3])),
    (([0], [], []), ([], [], [])),  # a zero token is still a token
])
def test_content_key_respects_boundaries(a, b):
    assert content_key(*a) != content_key(*b)


def test_content_key_is_non_negative_63_bit():
    rng = np.random.default_rng(0)
    keys = [content_key(rng.integers(0, 50_000, rng.integers(0, 20)), rng.integers(0, 50_000, rng.integers(0, 20)),
                        rng.integers(0, 50_000, rng.integers(0, 20))) for _ in range(500)]
    assert all(isinstance(k, int) and 0 <= k < 2**63 for k in keys)
    assert np.asarray(keys, np.int64).tolist() == keys  # fits the int64 column it is stored in
    assert max(keys) > 2**61  # uses the high bits (500 uniform draws: P(all below 2^61) = 4^-500)
    assert len(set(keys)) == 500


# --------------------------------------------------------------------------------------------------
# multiset_digest
# --------------------------------------------------------------------------------------------------
KEYS = [content_key([i], [i + 1], [i + 2]) for i in range(6)]


def test_multiset_digest_ignores_order():
    rng = np.random.default_rng(1)
    ref = multiset_digest(np.asarray(KEYS))
    for _ in range(5):
        assert multiset_digest(rng.permutation(KEYS)) == ref
    assert multiset_digest(KEYS) == ref  # a list works too
    assert len(ref) == 64 and int(ref, 16) >= 0


def test_multiset_digest_counts_duplicates():
    a, b = KEYS[:2]
    assert multiset_digest([a, b]) != multiset_digest([a, b, b])
    assert multiset_digest([a, a, b]) != multiset_digest([a, b, b])  # same set, same size, other counts
    assert multiset_digest([a]) != multiset_digest([a, a])


def test_multiset_digest_changes_with_any_key():
    ref = multiset_digest(KEYS)
    for i in range(len(KEYS)):
        changed = list(KEYS)
        changed[i] ^= 1
        assert multiset_digest(changed) != ref, i
        assert multiset_digest(KEYS[:i] + KEYS[i + 1:]) != ref, i


def test_multiset_digest_of_nothing():
    assert multiset_digest(np.zeros(0, np.int64)) == multiset_digest([])
    assert multiset_digest([]) != multiset_digest([0])


# --------------------------------------------------------------------------------------------------
# model_digest (local directories; the hub branch needs the network)
# --------------------------------------------------------------------------------------------------
def make_model(path, *, scale=1.0, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale, "b": torch.ones(3)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": 3, "model_type": "llama"}))
    return path


def test_model_digest_equal_for_a_byte_identical_copy(tmp_path):
    a = make_model(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    da = model_digest(str(a))
    assert da is not None and da.startswith("files:")
    assert model_digest(str(b)) == da
    assert model_digest(str(a) + "/") == da  # a trailing slash is the same directory
    assert model_digest(f"file://{a}") == da  # so is a file:// URL


def test_model_digest_changes_with_one_weight_byte(tmp_path):
    a = make_model(tmp_path / "a")
    before = model_digest(str(a))
    raw = bytearray((a / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01  # the last byte is tensor data, not the header
    (a / "model.safetensors").write_bytes(bytes(raw))
    assert model_digest(str(a)) != before


def test_model_digest_changes_with_config(tmp_path):
    a = make_model(tmp_path / "a")
    before = model_digest(str(a))
    (a / "config.json").write_text(json.dumps({"hidden_size": 3, "model_type": "llama", "rope_theta": 1e6}))
    assert model_digest(str(a)) != before


def test_model_digest_changes_with_an_extra_weight_shard(tmp_path):
    a = make_model(tmp_path / "a")
    before = model_digest(str(a))
    save_file({"x": torch.zeros(2)}, str(a / "model-00002-of-00002.safetensors"))
    assert model_digest(str(a)) != before


def test_model_digest_ignores_unrelated_files(tmp_path):
    a = make_model(tmp_path / "a")
    before = model_digest(str(a))
    (a / "README.md").write_text("# a model card")
    (a / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (a / "tokenizer_config.json").write_text("{}")
    (a / "special_tokens_map.json").write_text("{}")
    (a / "tokenizer.model").write_bytes(b"\x00\x01sentencepiece")
    (a / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert model_digest(str(a)) == before


def test_model_digest_none_without_weight_files(tmp_path):
    d = tmp_path / "no_weights"
    d.mkdir()
    assert model_digest(str(d)) is None  # empty
    (d / "config.json").write_text("{}")
    (d / "README.md").write_text("weights not downloaded")
    assert model_digest(str(d)) is None


def test_model_digest_of_pytorch_bin_weights(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    assert model_digest(str(d)).startswith("files:")


# --------------------------------------------------------------------------------------------------
# pass_key
# --------------------------------------------------------------------------------------------------
BASE_KEY_ARGS = dict(
    model="files:abc",
    data="d" * 64,
    tokenization={"tokenizer": "tok", "revision": None, "max_length": 512, "max_prompt_length": 256},
    precision="bf16",
)


def test_pass_key_deterministic_and_short():
    k = pass_key(**BASE_KEY_ARGS)
    assert k == pass_key(**BASE_KEY_ARGS)
    assert len(k) == 32 and int(k, 16) >= 0
    reordered = dict(reversed(list(BASE_KEY_ARGS["tokenization"].items())))
    assert pass_key(**(BASE_KEY_ARGS | {"tokenization": reordered})) == k  # dict order is not content


@pytest.mark.parametrize("field, value", [
    ("model", "files:abd"),
    ("model", "hub:org/m@123"),
    ("data", "e" * 64),
    ("precision", "fp32"),
])
def test_pass_key_changes_with_each_input(field, value):
    assert pass_key(**(BASE_KEY_ARGS | {field: value})) != pass_key(**BASE_KEY_ARGS)


def test_pass_key_of_an_ordered_entry_names_its_positions():
    plain = pass_key(**BASE_KEY_ARGS)
    ordered = pass_key(**BASE_KEY_ARGS, order="o" * 64)
    assert ordered != plain and ordered != pass_key(**BASE_KEY_ARGS, order="p" * 64)
    assert pass_key(**BASE_KEY_ARGS, order=None) == plain  # unordered keys are unchanged


def test_position_keys_follow_each_pair_to_its_place():
    ck, src = np.array([5, 6, 7]), np.array([0, 0, 1])
    files, lines = ["a.jsonl", "a.jsonl", "b.jsonl"], np.array([0, 1, 0])
    keys = position_keys(ck, src, files, lines)
    assert keys.dtype == np.int64 and (keys >= 0).all() and len(set(keys)) == 3
    perm = [2, 0, 1]  # the same rows in another order: the same multiset
    assert multiset_digest(position_keys(ck[perm], src[perm], [files[i] for i in perm], lines[perm])) == \
        multiset_digest(keys)
    swapped = position_keys(ck, src, files, np.array([1, 0, 0]))  # pairs 5 and 6 trade lines
    assert multiset_digest(swapped) != multiset_digest(keys)
    assert multiset_digest(position_keys(ck, np.array([0, 0, 2]), files, lines)) != multiset_digest(keys)
    assert multiset_digest(position_keys(ck, src, ["a.jsonl", "a.jsonl", "c.jsonl"], lines)) != multiset_digest(keys)


@pytest.mark.parametrize("name, value", [
    ("tokenizer", "other-tok"),
    ("revision", "main"),
    ("max_length", 1024),
    ("max_prompt_length", 128),
])
def test_pass_key_changes_with_each_tokenization_field(name, value):
    tok = BASE_KEY_ARGS["tokenization"] | {name: value}
    assert pass_key(**(BASE_KEY_ARGS | {"tokenization": tok})) != pass_key(**BASE_KEY_ARGS)


def test_pass_key_changes_when_a_tokenization_field_is_added_or_dropped():
    tok = dict(BASE_KEY_ARGS["tokenization"])
    ref = pass_key(**BASE_KEY_ARGS)
    assert pass_key(**(BASE_KEY_ARGS | {"tokenization": tok | {"chat_template": "x"}})) != ref
    del tok["revision"]  # None is a value, not an absence
    assert pass_key(**(BASE_KEY_ARGS | {"tokenization": tok})) != ref


def test_pass_key_changes_with_scorer_version(monkeypatch):
    before = pass_key(**BASE_KEY_ARGS)
    monkeypatch.setattr(caching, "SCORER_VERSION", caching.SCORER_VERSION + "+1")
    assert pass_key(**BASE_KEY_ARGS) != before


# --------------------------------------------------------------------------------------------------
# Entries and markers
# --------------------------------------------------------------------------------------------------
META = {"key": "k" * 32, "num_rows": 37, "seconds": 1.5, "tokenization": {"max_length": 512}}


def test_entry_path():
    assert entry_path("/cache", "abc") == "/cache/scores/abc"
    assert entry_path("/cache/", "abc") == "/cache/scores/abc"
    assert entry_path("s3://bucket/c/", "abc") == "s3://bucket/c/scores/abc"
    assert entry_path("memory://c", "abc") == "memory://c/scores/abc"


def test_cache_entry_to_dict():
    e = CacheEntry("k", "/p")
    assert e.to_dict() == {"key": "k", "path": "/p", "status": "miss", "seconds": 0.0, "pairs_per_s": None,
                           "num_rows": None, "scored_with": []}


def test_marker_round_trip_leaves_no_temporary_files(tmp_path):
    entry = tmp_path / "scores" / "k"
    entry.mkdir(parents=True)
    (entry / "part-0.parquet").write_bytes(b"rows")
    assert read_marker(str(entry)) is None
    write_marker(str(entry), META)
    assert read_marker(str(entry)) == META
    assert sorted(os.listdir(entry)) == sorted([MARKER, "part-0.parquet"])
    write_marker(str(entry), META | {"num_rows": 38})  # a rewrite replaces the marker
    assert read_marker(str(entry))["num_rows"] == 38
    assert sorted(os.listdir(entry)) == sorted([MARKER, "part-0.parquet"])


def test_read_marker_absent_directory(tmp_path):
    assert read_marker(str(tmp_path / "never-written")) is None


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"num_rows": 3', b"\xff\xfe\x00garbage"])
def test_read_marker_corrupt_is_a_miss(tmp_path, content):
    (tmp_path / MARKER).write_bytes(content)
    assert read_marker(str(tmp_path)) is None


def test_clear_removes_a_tree_and_is_a_noop_when_absent(tmp_path):
    entry = tmp_path / "scores" / "k"
    (entry / "sub").mkdir(parents=True)
    (entry / "sub" / "part.parquet").write_bytes(b"x")
    write_marker(str(entry), META)
    clear(str(entry))
    assert not entry.exists()
    assert (tmp_path / "scores").is_dir()  # only the entry goes
    clear(str(entry))  # absent: nothing to do, no error
    assert read_marker(str(entry)) is None


def test_marker_round_trip_on_fsspec_memory():
    root = f"memory://sdpo-test-{uuid.uuid4().hex}/scores/k"
    fs, path = fsspec.core.url_to_fs(root)
    try:
        fs.pipe(f"{path}/part-0.parquet", b"rows")
        assert read_marker(root) is None
        write_marker(root, META)
        assert read_marker(root) == META
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        assert names == sorted([MARKER, "part-0.parquet"])
        clear(root)
        assert not fs.exists(path)
        assert read_marker(root) is None
        clear(root)  # absent: no error
    finally:
        top = path.split("/scores")[0]
        if fs.exists(top):
            fs.rm(top, recursive=True)


def test_model_digest_ignores_trainer_state_beside_the_weights(tmp_path):
    """optimizer.pt, rng_state_*.pth, training_args.bin sit in checkpoint folders but are not the model."""
    make_model(tmp_path / "m")
    before = model_digest(str(tmp_path / "m"))
    for name in ("optimizer.pt", "rng_state_0.pth", "training_args.bin", "scheduler.pt"):
        (tmp_path / "m" / name).write_bytes(os.urandom(64))
    assert model_digest(str(tmp_path / "m")) == before
    only_state = tmp_path / "state"
    only_state.mkdir()
    (only_state / "training_args.bin").write_bytes(b"x")
    assert model_digest(str(only_state)) is None


def test_read_marker_rejects_json_that_is_not_an_object(tmp_path):
    (tmp_path / caching.MARKER).write_text("[1]")
    assert read_marker(str(tmp_path)) is None


def test_pass_key_names_the_layout_only_where_it_changes_the_values():
    """Under bf16 (weights or autocast) the layout changes the log-probs beyond summation order; in fp32 it
    does not, so fp32 entries are shared between layouts (and keep the keys they had)."""
    fp32 = BASE_KEY_ARGS | {"precision": "fp32"}
    assert pass_key(**fp32, layout="prefix") == pass_key(**fp32, layout="shared") == pass_key(**fp32)
    for precision in ("bf16", "autocast"):
        args = BASE_KEY_ARGS | {"precision": precision}
        assert pass_key(**args, layout="prefix") != pass_key(**args, layout="shared")
