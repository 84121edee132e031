"""Bad input, end to end: each case gives one clear error (or, for rows, a quarantine) before training.

Errors that the driver can see from a listing, a Parquet footer, a small file or the model folder come
before Ray starts: those tests make `init_ray` fail, so an error raised any later would show. The cases
that need the ingest pass (a corrupt line, an empty file among others, a file of another format) share
one Ray session. `sdpo validate` runs as a subprocess for two of them, as a user runs it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sdpo.config import ConfigError, parse_job
from sdpo.ingest import IngestReport
from sdpo.pipeline import check_model, run

from .conftest import STORIES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)  # a few tests start Ray; none should take long
GOOD = {"prompt": "Tell me a story.", "chosen": "Once upon a time there was a cat.", "rejected": "No."}


def good_lines(n: int) -> list[str]:
    return [json.dumps(GOOD | {"chosen": f"Once upon a time there were {i} cats."}) for i in range(n)]


def raw_job(tmp_path: Path, paths, *, model=None, tokenizer=None, **data) -> dict:
    sources = paths if isinstance(paths, list) and isinstance(paths[0], dict) else [{"name": "s", "path": paths}]
    return {
        "name": "bad-input",
        "model": {"path": str(model or STORIES)} | ({"tokenizer": str(tokenizer)} if tokenizer else {}),
        "data": {"sources": sources, "max_length": 64, "max_prompt_length": 16, "eval": {"fraction": 0.0}} | data,
        "training": {"batch_size": 4},
        "scaling": {"num_workers": 1},
        "output_dir": str(tmp_path / "out"),
    }


def job(tmp_path: Path, paths, **kw):
    return parse_job(raw_job(tmp_path, paths, **kw))


def nothing_ran(out: Path) -> bool:
    return not any((out / d).exists() for d in ("stages", "ray", "data"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub lookups: a path that is mistaken for a hub id would retry for ~30 s without a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if the run gets as far as starting Ray."""
    def refuse(address):
        raise AssertionError("Ray was started: the error should have come before")

    monkeypatch.setattr("sdpo.pipeline.init_ray", refuse)


def plan_error(tmp_path: Path, j) -> str:
    with pytest.raises(ConfigError) as err:
        run(j, output_dir=str(tmp_path / "out"), plan_only=True, log=lambda s: None)
    assert nothing_ran(tmp_path / "out")
    return str(err.value)


def sdpo_validate(tmp_path: Path, raw: dict) -> subprocess.CompletedProcess:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sdpo.cli", "validate", str(tmp_path / "job.yaml"),
                           "--output", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


# --------------------------------------------------------------------------------------------------
# A glob matching nothing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "why"), [
    ("nope*.jsonl", r"no file in '.*/d' matches \(it holds folder, good.jsonl\); check the glob"),
    ("missing/*.jsonl", r"the folder '.*missing' does not exist"),
    ("folder", r"it is a folder; give a glob such as '.*folder/\*.jsonl'"),
    ("absent.jsonl", r"no such file; check the path"),
], ids=["glob", "glob_in_missing_folder", "folder", "missing_file"])
def test_glob_matching_nothing_names_the_source_and_pattern(tmp_path, no_ray, pattern, why):
    (tmp_path / "d" / "folder").mkdir(parents=True)
    (tmp_path / "d" / "good.jsonl").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "d" / pattern)))
    assert msg.startswith(f"data.sources[s].path: {str(tmp_path / 'd' / pattern)!r} matches no file: ")
    assert re.search(why, msg), msg


def test_glob_matching_nothing_through_sdpo_validate(tmp_path):
    pattern = str(tmp_path / "shards" / "part-*.jsonl")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.json").write_text("\n".join(good_lines(3)))
    proc = sdpo_validate(tmp_path, raw_job(tmp_path, [{"name": "orca", "path": pattern}]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: data.sources[orca].path: {pattern!r} matches no file" in proc.stderr
    assert "it holds part-0.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert nothing_ran(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# A Parquet file with the wrong schema (one error from the footer, not every row quarantined)
# --------------------------------------------------------------------------------------------------
def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(("rows", "expected"), [
    ([{"question": "q", "answer": "a"}] * 5,
     "it has columns ['question', 'answer']; expected columns prompt + chosen + rejected"),
    ([{"prompt": "p", "chosen": 1, "rejected": 2}] * 5,
     "column 'chosen' has type int64, not text"),
], ids=["other_columns", "numbers_for_text"])
def test_parquet_with_the_wrong_schema_is_one_error_before_ray(tmp_path, no_ray, rows, expected):
    good = write_parquet(tmp_path / "a.parquet", [GOOD] * 5)
    bad = write_parquet(tmp_path / "b.parquet", rows)
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "*.parquet")))
    assert msg.startswith("data.sources[s]: 1 file(s) hold no usable preference rows:")
    assert f"{bad}: {expected}" in msg
    assert "or prompt + responses + rewards" in msg
    assert str(good) not in msg


def test_a_file_that_is_not_parquet_is_named(tmp_path, no_ray):
    (tmp_path / "rows.parquet").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "rows.parquet")))
    assert f"{tmp_path / 'rows.parquet'}: is not a readable Parquet file (Parquet magic bytes" in msg
    assert "set the source's format" in msg


# --------------------------------------------------------------------------------------------------
# Empty files: a source whose files are all empty is an error; one empty file among others a warning
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zero_bytes", "blank_lines", "empty_array", "parquet_no_rows"])
def test_a_source_of_empty_files_is_an_error_before_ray(tmp_path, no_ray, kind):
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    if kind == "parquet_no_rows":
        empty = tmp_path / "empty.parquet"
        pq.write_table(pa.Table.from_pylist([GOOD]).slice(0, 0), empty)
    else:
        empty = tmp_path / "empty.jsonl"
        empty.write_text({"zero_bytes": "", "blank_lines": "\n  \n\n", "empty_array": "[ ]\n"}[kind])
    sources = [{"name": "good", "path": str(tmp_path / "good.jsonl")}, {"name": "hollow", "path": str(empty)}]
    msg = plan_error(tmp_path, job(tmp_path, sources))
    assert msg == (f"data.sources[hollow]: every file it matches is empty (0 bytes, blank lines only or no rows): "
                   f"{empty}; check the path or glob, or remove the source")


def test_an_empty_file_among_others_is_warned_and_counted(ray_session, tmp_path, shared, caplog):
    (tmp_path / "part-0.jsonl").write_text("\n".join(good_lines(8)) + "\n")
    (tmp_path / "part-1.jsonl").write_text("")
    (tmp_path / "part-2.jsonl").write_text("\n\n")
    summary = run(job(tmp_path, str(tmp_path / "part-*.jsonl")), plan_only=True, log=lambda s: None)
    empty = [str(tmp_path / "part-1.jsonl"), str(tmp_path / "part-2.jsonl")]
    assert summary["data"]["empty_files"] == {"s": empty}
    assert summary["data"]["valid"] == {"s": 8} and summary["rejected_rows"] == 0
    assert f"data.sources[s]: 2 of 3 files are empty and add no rows: {', '.join(empty)}" in caplog.text


def test_empty_files_are_not_reported_for_a_capped_source():
    """A source read with max_rows stops early: its unread files are not 'empty'."""
    report = IngestReport(files={"a": ["/d/1.jsonl", "/d/2.jsonl"], "b": ["s3://bkt/x.jsonl", "s3://bkt/y.jsonl"],
                                 "c": ["/e/1.jsonl", "/e/2.jsonl"]}, capped={"c"})
    report.file_rows.update({"/d/1.jsonl": 5, "bkt/x.jsonl": 3, "/e/1.jsonl": 2})  # Ray drops the s3:// scheme
    assert report.empty_files == {"a": ["/d/2.jsonl"], "b": ["s3://bkt/y.jsonl"]}


# --------------------------------------------------------------------------------------------------
# Rows: a corrupt JSON line is quarantined with its file, line and reason; a file of another format
# --------------------------------------------------------------------------------------------------
def test_a_corrupt_json_line_is_quarantined_with_file_line_and_reason(ray_session, tmp_path, shared):
    src = tmp_path / "pairs.jsonl"
    lines = good_lines(20)
    corrupt = '{"prompt": "Tell me a story.", "chosen": "Once upon'
    lines[6:6] = ["", corrupt]  # a blank line (not a row) then the corrupt one: line 8 of the file
    src.write_text("\n".join(lines) + "\n")
    summary = run(job(tmp_path, str(src), max_rejected_fraction=0.1), plan_only=True, log=lambda s: None)
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "rejected_rows.jsonl").read_text().splitlines()]
    assert (row["source"], row["file"], row["line"], row["raw"]) == ("s", str(src), 8, corrupt)
    assert row["reason"].startswith("invalid JSON: ")
    assert summary["rejected_rows"] == 1 and summary["data"]["valid"] == {"s": 20}
    assert summary["data"]["rejected_by_source_and_reason"] == {"s": {row["reason"]: 1}}


def test_a_jsonl_file_of_another_format_is_named_when_the_run_stops(ray_session, tmp_path, shared):
    """JSON Lines are not schema-checked up front (a first row proves nothing about the rest); when
    its rows push the quarantine past the threshold, the file whose every row failed is named."""
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(10)))
    other = tmp_path / "qa.jsonl"
    other.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(5)))
    with pytest.raises(ConfigError) as err:
        run(job(tmp_path, str(tmp_path / "*.jsonl")), log=lambda s: None)
    msg = str(err.value)
    assert msg.startswith("5 of 15 rows (33.3%) were quarantined, more than data.max_rejected_fraction=0.05")
    assert "  s: missing field 'prompt': 5" in msg
    assert "Every row of these files was quarantined; are they in another format?" in msg
    assert f"\n  {other}: all 5 rows quarantined" in msg and "good.jsonl" not in msg
    assert not (tmp_path / "out" / "stages").exists() and not (tmp_path / "out" / "ray").exists()


# --------------------------------------------------------------------------------------------------
# A model path that is not a model
# --------------------------------------------------------------------------------------------------
def not_a_model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "random_files":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
        (path / "blob.bin").write_bytes(os.urandom(64))
    elif kind == "text_file":
        path.write_text("not a model\n")
    elif kind == "truncated_weights":
        path.mkdir()
        for f in STORIES.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        weights = (STORIES / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif kind == "no_weights":
        path.mkdir()
        (path / "config.json").write_text((STORIES / "config.json").read_text())
    return path  # "missing": nothing there


@pytest.mark.parametrize(("kind", "problem"), [
    ("missing", "does not exist (and is not a hub id 'name' or 'org/name'); check the path"),
    ("empty_dir", "is an empty folder; it must hold a Hugging Face model"),
    ("random_files", "has no config.json (it holds blob.bin, notes.txt); point it at a Hugging Face model folder"),
    ("text_file", "is a file; it must be a Hugging Face model folder"),
    ("no_weights", "has no weights (it holds config.json); expected model.safetensors or pytorch_model.bin"),
    ("truncated_weights", "has a broken weights file: model.safetensors is truncated or corrupt: its header "
                          "describes 1176152 bytes, the file has 588076"),
])
def test_a_model_path_that_is_not_a_model_is_one_line_before_ray(tmp_path, no_ray, shared, kind, problem):
    path = not_a_model(tmp_path, kind)
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "good.jsonl"), model=path))
    assert msg.startswith(f"model.path {str(path)!r} {problem}"), msg
    assert "\n" not in msg and len(msg) < 400


def test_a_model_path_that_is_not_a_model_through_sdpo_validate(tmp_path, shared):
    path = not_a_model(tmp_path, "random_files")
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    proc = sdpo_validate(tmp_path, raw_job(tmp_path, str(tmp_path / "good.jsonl"), model=path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: model.path {str(path)!r} has no config.json (it holds blob.bin, notes.txt); "
        "point it at a Hugging Face model folder")
    assert "Traceback" not in proc.stderr
    assert nothing_ran(tmp_path / "out")


def test_a_config_transformers_cannot_read_is_summarised(tmp_path, no_ray, shared):
    path = not_a_model(tmp_path, "truncated_weights")
    (path / "model.safetensors").write_bytes((STORIES / "model.safetensors").read_bytes())
    (path / "config.json").write_text("{}")  # no model_type
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "good.jsonl"), model=path))
    assert msg == (f"model.path {str(path)!r} is not a loadable model: Unrecognized model in {path}. "
                   "Should have a `model_type` key in its config.json.")


# --------------------------------------------------------------------------------------------------
# A tokenizer whose vocabulary does not match the model (stories260K: vocab_size 512)
# --------------------------------------------------------------------------------------------------
def word_tokenizer(path: Path, vocab: dict[str, int]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def words(n: int, start: int = 3) -> dict[str, int]:
    return {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": start + i for i in range(n)}


def test_a_tokenizer_larger_than_the_model_is_an_error_before_ray(tmp_path, no_ray, shared):
    tok = word_tokenizer(tmp_path / "big-tok", words(597))  # 600 tokens, ids 0..599
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "good.jsonl"), tokenizer=tok))
    assert msg == (f"model.tokenizer {str(tok)!r} has 600 tokens with ids up to 599, but model {str(STORIES)!r} "
                   f"has vocab_size 512 (ids 0..511); they do not belong together; set model.tokenizer to "
                   f"model {str(STORIES)!r}'s own tokenizer")


def test_a_special_token_past_the_models_vocabulary_is_an_error(tmp_path, no_ray, shared):
    """13 tokens (fewer than 512), but EOS has id 700: len(tok) alone would not see it."""
    tok = word_tokenizer(tmp_path / "sparse-tok", words(10) | {"</s>": 700})
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(3)))
    msg = plan_error(tmp_path, job(tmp_path, str(tmp_path / "good.jsonl"), tokenizer=tok))
    assert msg.startswith(f"model.tokenizer {str(tok)!r}: its eos token '</s>' has id 700, but model "
                          f"{str(STORIES)!r} has vocab_size 512 (ids 0..511)")


def test_a_tokenizer_smaller_than_the_models_embedding_is_fine(tmp_path, shared):
    """Embeddings are often padded past the tokenizer (to a multiple of 64): not an error."""
    tok = word_tokenizer(tmp_path / "small-tok", words(97))
    assert len(check_model(job(tmp_path, "unused", tokenizer=tok))) == 100


# --------------------------------------------------------------------------------------------------
# The same file checks on object storage: footers and sizes through fsspec, paths named with s3://
# --------------------------------------------------------------------------------------------------
def test_file_checks_read_parquet_footers_and_sizes_on_s3(s3_server, tmp_path, caplog):
    import fsspec

    from sdpo.pipeline import resolve_files

    from .s3server import clear_fs_caches

    clear_fs_caches()
    bucket = s3_server.make_bucket("sdpo-bad-input")
    write_parquet(tmp_path / "qa.parquet", [{"question": "q", "answer": "a"}] * 3)
    for name, body in {"good/part-0.jsonl": "\n".join(good_lines(3)).encode(), "good/part-1.jsonl": b"",
                       "bad/part-0.parquet": (tmp_path / "qa.parquet").read_bytes()}.items():
        with fsspec.open(f"{bucket}/{name}", "wb") as f:
            f.write(body)
    files = resolve_files(job(tmp_path, f"{bucket}/good/*.jsonl"))
    assert files == {"s": [f"{bucket}/good/part-0.jsonl", f"{bucket}/good/part-1.jsonl"]}
    assert f"1 of 2 files are empty and add no rows: {bucket}/good/part-1.jsonl" in caplog.text
    with pytest.raises(ConfigError) as err:
        resolve_files(job(tmp_path, f"{bucket}/bad/*.parquet"))
    assert f"{bucket}/bad/part-0.parquet: it has columns ['question', 'answer']; expected columns prompt" in str(err.value)
    with pytest.raises(ConfigError, match=r"matches no file: the folder 's3://sdpo-bad-input/nope' does not exist"):
        resolve_files(job(tmp_path, f"{bucket}/nope/*.jsonl"))


# --------------------------------------------------------------------------------------------------
# Files that only the ingest pass can find broken: one clear error, not Ray's trace
# --------------------------------------------------------------------------------------------------
def test_a_corrupt_json_array_file_is_one_error_naming_file_and_position(ray_session, tmp_path, shared):
    """A JSON array parses as a whole (no row can be quarantined alone): the error says so."""
    (tmp_path / "good.jsonl").write_text("\n".join(good_lines(10)))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([GOOD] * 3, indent=1)[:-20])
    with pytest.raises(ConfigError) as err:
        run(job(tmp_path, [str(tmp_path / "good.jsonl"), str(array)]), plan_only=True, log=lambda s: None)
    msg = str(err.value)
    assert re.fullmatch(rf"data.sources\[s\]: {re.escape(str(array))} is not valid JSON at line \d+ column \d+ "
                        r"\(.*\); a JSON array is parsed as a whole, .* write it as JSON Lines .*", msg), msg
    assert "Traceback" not in msg and "ray::" not in msg
    assert not (tmp_path / "out" / "stages").exists()


def test_a_parquet_file_with_a_corrupt_page_is_one_error(ray_session, tmp_path, shared):
    """The footer is intact (the driver's check passes); a data page is not."""
    import io

    rows = pa.table({"prompt": [f"Tell me story {i}." for i in range(300)], "chosen": ["Once upon a time."] * 300,
                     "rejected": ["No."] * 300})
    buf = io.BytesIO()
    pq.write_table(rows, buf)
    data = bytearray(buf.getvalue())
    page = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(0).data_page_offset
    data[page + 10:page + 400] = b"\x55" * 390
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        run(job(tmp_path, str(bad)), plan_only=True, log=lambda s: None)
    msg = str(err.value)
    assert msg.startswith(f"data.sources[s]: {bad} is a corrupt Parquet file (reading from row 1: "), msg
    assert msg.endswith("); rewrite it or remove it") and "\n" not in msg
