"""Ingest helpers that need no Ray session: row identity and the per-block preparation."""

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
