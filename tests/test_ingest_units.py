"""Ingest helpers that need no Ray session: row identity and the per-block preparation."""

import copy
import json

import numpy as np
import pyarrow as pa

from sdpo.ingest import TokenizerSettings, file_identity, prepare_block, source_roots

from .conftest import STORIES


def test_same_file_name_in_two_folders_gives_distinct_identities():
    files = {"s": ["/d/2023/data.jsonl", "/d/2024/data.jsonl"], "t": ["/x/one.jsonl"],
             "u": ["s3://b/p/a1.jsonl", "s3://b/p/a2.jsonl"]}
    roots = source_roots(files)
    ids = {k: [file_identity(p, roots[k]) for p in v] for k, v in files.items()}
    assert ids == {"s": ["2023/data.jsonl", "2024/data.jsonl"], "t": ["one.jsonl"], "u": ["a1.jsonl", "a2.jsonl"]}


def test_identity_does_not_depend_on_where_the_files_are():
    local = source_roots({"s": ["/home/me/data/a.jsonl", "/home/me/data/sub/b.jsonl"]})["s"]
    bucket = source_roots({"s": ["s3://bkt/data/a.jsonl", "s3://bkt/data/sub/b.jsonl"]})["s"]
    assert file_identity("/home/me/data/sub/b.jsonl", local) == file_identity("s3://bkt/data/sub/b.jsonl", bucket)


def test_prepare_block_keys_differ_across_folders_and_bad_rows_keep_raw():
    good = '{"prompt": "Tell me.", "chosen": "Once upon a time.", "rejected": "No."}'
    batch = pa.table({"source": ["s", "s", "s"], "file": ["/d/2023/x.jsonl", "/d/2024/x.jsonl", "/d/2024/x.jsonl"],
                      "line": [1, 1, 2], "raw": [good, good, "{oops"]})
    settings = TokenizerSettings(path=str(STORIES), revision=None, trust_remote_code=False, max_length=64,
                                 max_prompt_length=16, eos_id=2, seed=0, eval_seed=0, roots={"s": "/d"})
    out = prepare_block(batch, settings).to_pydict()
    assert out["reason"][:2] == ["", ""] and out["reason"][2].startswith("invalid JSON")
    assert out["split_key"][0] != out["split_key"][1] and out["eval_key"][0] != out["eval_key"][1]
    assert out["raw"] == ["", "", "{oops"]  # only quarantined rows keep their text
    assert out["chosen_ids"][0][-1] == 2 and out["prompt_ids"][2] == []
    n = out["num_tokens"][0]
    assert n == 2 * len(out["prompt_ids"][0]) + len(out["chosen_ids"][0]) + len(out["rejected_ids"][0])
    assert np.all(np.asarray(out["line"]) == [1, 1, 2])


def test_identities_of_the_common_layouts_are_pinned():
    """Identities feed the split keys and the cache keys: these must not change between versions."""
    files = {"one": ["/data/orca.jsonl"], "dir": ["/data/uf/train-0.parquet", "/data/uf/train-1.parquet"],
             "s3": ["s3://bkt/uf/train-0.parquet", "s3://bkt/uf/train-1.parquet"],
             "hub": ["hf://datasets/Intel/orca_dpo_pairs/orca_rlhf.jsonl"],
             "buckets": ["s3://b1/x.jsonl", "s3://b2/y.jsonl"]}
    roots = source_roots(files)
    ids = {k: [file_identity(p, roots[k]) for p in v] for k, v in files.items()}
    assert ids == {"one": ["orca.jsonl"], "dir": ["train-0.parquet", "train-1.parquet"],
                   "s3": ["train-0.parquet", "train-1.parquet"], "hub": ["orca_rlhf.jsonl"],
                   "buckets": ["b1/x.jsonl", "b2/y.jsonl"]}
    # Ray hands the reader a bucket's files without their scheme: the identity is then the whole key
    assert file_identity("bkt/uf/train-0.parquet", roots["s3"]) == "bkt/uf/train-0.parquet"


def test_folders_whose_names_share_a_prefix_give_distinct_identities():
    """/d/a and /d/ab share the characters "/d/a", not a folder: the root is /d, and a/b/y.jsonl cannot
    become the same b/y.jsonl as ab/y.jsonl."""
    files = ["/d/a/z.jsonl", "/d/ab/y.jsonl", "/d/a/b/y.jsonl"]
    root = source_roots({"s": files})["s"]
    assert root == "/d"
    assert [file_identity(p, root) for p in files] == ["a/z.jsonl", "ab/y.jsonl", "a/b/y.jsonl"]
    assert file_identity("/d/ab/y.jsonl", "/d/a") == "/d/ab/y.jsonl"  # not a file under /d/a


# --------------------------------------------------------------------------------------------------
# Reading JSON files: byte order marks, bytes that are not UTF-8, characters split across chunks
# --------------------------------------------------------------------------------------------------
ROW = '{"prompt": "Once upon a time", "chosen": " there was a cat", "rejected": " the dog ran"}'


def _read(data: bytes, path: str = "/d/a.json") -> dict:
    from sdpo.ingest import PreferenceFiles

    reader = PreferenceFiles.__new__(PreferenceFiles)  # no Ray: only the per-file reader is exercised
    reader._source, reader._fmt = "s", "auto"
    blocks = list(reader._read_stream(pa.BufferReader(data), path))
    return pa.concat_tables(blocks).to_pydict()


def _settings(**kw) -> TokenizerSettings:
    return TokenizerSettings(path=str(STORIES), revision=None, trust_remote_code=False, max_length=64,
                             max_prompt_length=32, eos_id=2, seed=0, eval_seed=0, roots={"s": "/d"}, **kw)


def test_a_byte_order_mark_is_not_part_of_the_first_row():
    bom = b"\xef\xbb\xbf"
    lines = _read(bom + f"{ROW}\n{ROW}\n".encode())
    assert lines["raw"] == [ROW, ROW] and lines["line"] == [1, 2]
    array = _read(bom + f"[{ROW},\n{ROW}]".encode())  # still read as one JSON array
    assert len(array["raw"]) == 2 and array["line"] == [1, 2]
    out = prepare_block(pa.table(lines), _settings()).to_pydict()
    assert out["reason"] == ["", ""]


def test_a_line_that_is_not_utf8_is_quarantined_with_the_byte_offset():
    bad = ROW[:20].encode() + b"\xff\xfe" + ROW[20:].encode()
    read = _read(ROW.encode() + b"\n" + bad + b"\n" + ROW.encode())
    assert read["problem"] == ["", "not valid UTF-8 at byte 20 of the line", ""]
    assert "\\xff\\xfe" in read["raw"][1]  # the quarantine file shows the bad bytes
    out = prepare_block(pa.table(read), _settings()).to_pydict()
    assert out["reason"] == ["", "not valid UTF-8 at byte 20 of the line", ""]
    assert out["raw"][1] == read["raw"][1] and out["chosen_ids"][1] == [] and out["chosen_ids"][2]


def test_a_character_split_across_read_chunks_is_read_whole(monkeypatch):
    import sdpo.ingest

    row = ROW.replace("cat", "chat – café")
    data = (row + "\n").encode() * 3
    monkeypatch.setattr(sdpo.ingest, "_CHUNK", 7)  # cuts through the 3-byte "–" and the 2-byte "é"
    assert any(data[i] & 0xC0 == 0x80 for i in range(7, len(data), 7))  # a chunk starts mid-character
    read = _read(data, "/d/a.jsonl")
    assert read["raw"] == [row] * 3 and read["problem"] == ["", "", ""]


def test_a_chat_template_that_raises_is_a_quarantined_row_not_a_failed_ingest(monkeypatch):
    import sdpo.ingest
    from sdpo.ingest import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(str(STORIES), None, False))
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    monkeypatch.setattr(sdpo.ingest, "load_tokenizer", lambda *a: tok)
    convo = json.dumps({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                        "chosen": [{"role": "assistant", "content": "Hello"}],
                        "rejected": [{"role": "assistant", "content": "Go"}]})
    batch = pa.table({"source": ["s", "s"], "file": ["/d/x.jsonl"] * 2, "line": [1, 2], "raw": [convo, ROW]})
    out = prepare_block(batch, _settings()).to_pydict()
    assert out["reason"] == ["the chat template failed on this row: System role not supported", ""]
    assert out["raw"][0] == convo
