"""Hub datasets' own layouts map onto TRL rows through a source's `columns:` and `implicit_prompt`."""

import pyarrow as pa
import pytest

from sdpo.config import ConfigError, SourceConfig, parse_job
from sdpo.inputs import parquet_problem
from sdpo.rows import RowError, RowMapping, parse_record, prepare_record, validate_pair

from .conftest import STORIES

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


def test_system_column_goes_first_in_a_prompt_that_is_already_a_conversation():
    mapping = RowMapping((("system", "sys"),))
    row = mapping.apply({"sys": "Be terse.", "prompt": [{"role": "user", "content": "hi"}],
                         "chosen": [{"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "assistant", "content": "b"}]})
    assert row["prompt"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert "sys" not in row and "system" not in row
    # an empty system text is left out, as with a string prompt
    assert mapping.apply({"sys": " ", "prompt": [{"role": "user", "content": "hi"}]})["prompt"] == [
        {"role": "user", "content": "hi"}]


def test_system_column_reaches_an_implicit_prompt():
    row = RowMapping((("system", "system"),), implicit_prompt=True).apply(dict(UF_ROW, system="Be terse."))
    assert row["prompt"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]
    assert row["chosen"] == [{"role": "assistant", "content": "Blue."}]


def test_a_system_message_from_the_column_and_from_the_prompt_is_a_row_error():
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    with pytest.raises(RowError, match=r"two system messages: the 'sys' column .* and one in the prompt's messages"):
        RowMapping((("system", "sys"),)).apply({"sys": "Be terse.", "prompt": prompt})


def test_a_system_column_that_is_not_text_is_a_row_error():
    with pytest.raises(RowError, match=r"field 'system' \(column 'sys'\) must be a string, got int"):
        RowMapping((("system", "sys"),)).apply({"sys": 3, "prompt": "hi", "chosen": "a", "rejected": "b"})


def test_null_columns_are_absent_columns():
    """A Parquet file that mixes pairs and K-response rows fills each row's missing columns with null;
    a JSON row may say "responses": null. Neither makes the row both kinds at once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    kw = dict(max_length=64, max_prompt_length=32, eos_id=tok.eos_token_id)
    pair = {"prompt": "Once upon a time", "chosen": " there was a cat", "rejected": " the dog ran",
            "responses": None, "rewards": None}
    group = {"prompt": "Once upon a time", "chosen": None, "rejected": None,
             "responses": [" a cat", " a dog", " a bird"], "rewards": [1.0, 0.0, 0.5]}
    assert prepare_record(pair, tok, **kw).responses_ids == []
    assert len(prepare_record(group, tok, **kw).responses_ids) == 3
    assert parse_record('{"prompt": "p", "responses": null, "x": 1}') == {"prompt": "p", "x": 1}
    with pytest.raises(RowError, match="missing field 'chosen'"):  # a null field is still named as missing
        prepare_record({"prompt": "p", "chosen": None, "rejected": "r"}, tok, **kw)
