"""Hub datasets' own layouts map onto TRL rows through a source's `columns:` and `implicit_prompt`."""

import pyarrow as pa
import pytest

from sdpo.config import ConfigError, SourceConfig, parse_job
from sdpo.inputs import parquet_problem
from sdpo.rows import RowError, RowMapping, validate_pair

# Intel/orca_dpo_pairs: {system, question, chosen, rejected}, all strings
ORCA_ROW = {"system": "You are a helpful assistant.", "question": "What is 2+2?", "chosen": "4.", "rejected": "5."}
# argilla/ultrafeedback-binarized-preferences-cleaned: a prompt string and two whole conversations
UF_ROW = {
    "prompt": "Name a colour.",
    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
    "chosen-rating": 5.0, "rejected-rating": 2.0,
}


def test_system_and_question_columns_become_a_conversation():
    source = SourceConfig(name="orca", path="x.jsonl", columns={"prompt": "question", "system": "system"})
    row = source.mapping.apply(dict(ORCA_ROW))
    assert row["prompt"] == [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is 2+2?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "4."}]
    assert "question" not in row and "system" not in row
    assert validate_pair(row) == "conversational"


def test_empty_system_message_is_left_out():
    row = RowMapping((("prompt", "question"), ("system", "system"))).apply(dict(ORCA_ROW, system=""))
    assert row["prompt"] == [{"role": "user", "content": "What is 2+2?"}]


def test_implicit_prompt_is_the_shared_leading_messages():
    source = SourceConfig(name="uf", path="x.parquet", implicit_prompt=True,
                          columns={"score_chosen": "chosen-rating", "score_rejected": "rejected-rating"})
    row = source.mapping.apply(dict(UF_ROW))
    assert row["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert row["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Seven."}]
    assert (row["score_chosen"], row["score_rejected"]) == (5.0, 2.0)
    assert validate_pair(row) == "conversational"


def test_rows_without_prompt_are_read_as_implicit_by_default():
    row = RowMapping().apply({k: v for k, v in UF_ROW.items() if k != "prompt"})
    assert row["prompt"] == [{"role": "user", "content": "Name a colour."}]


def test_conversations_that_share_nothing_are_a_row_error():
    bad = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
           "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(RowError, match="share no leading message"):
        RowMapping(implicit_prompt=True).apply(bad)
    with pytest.raises(RowError, match="must both be lists"):
        RowMapping(implicit_prompt=True).apply({"chosen": "x", "rejected": "y"})


def test_unknown_mapped_field_names_the_allowed_ones():
    raw = {"model": {"path": "m"}, "data": {"sources": [{"name": "a", "path": "a.jsonl", "columns": {"answer": "x"}}]}}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['answer'\].*'prompt'"):
        parse_job(raw)


def test_parquet_schema_check_reads_through_the_mapping():
    orca = pa.schema([("system", pa.string()), ("question", pa.string()), ("chosen", pa.string()),
                      ("rejected", pa.string())])
    assert "expected columns prompt" in parquet_problem(orca)
    assert parquet_problem(orca, RowMapping((("prompt", "question"), ("system", "system")))) is None
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    implicit = pa.schema([("chosen", messages), ("rejected", messages)])
    assert parquet_problem(implicit) is None  # whole conversations: the prompt is their shared start
    strings = pa.schema([("chosen", pa.string()), ("rejected", pa.string())])
    assert "expected columns prompt" in parquet_problem(strings)
