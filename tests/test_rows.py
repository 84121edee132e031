"""Preference rows: every bad row is a RowError with its reason; good rows tokenise as documented."""

import copy
import json
import math

import pytest

from sdpo.rows import (
    FALLBACK_CHAT_TEMPLATE,
    RenderedPair,
    RowError,
    parse_record,
    prepare_record,
    render_pair,
    tokenize_pair,
    validate_pair,
    validate_scores,
)

MODEL = "/work/shared/models/stories260K"  # a real Llama (SentencePiece) tokenizer, without a chat template

# Standard completions carry their separator, as in TRL's examples: the text read is prompt + completion.
STANDARD = {"prompt": "Tell me a story.", "chosen": " Once upon a time there was a cat.", "rejected": " No."}
CONVO = {
    "prompt": [{"role": "user", "content": "Tell me a story."}],
    "chosen": [{"role": "assistant", "content": "Once upon a time there was a cat."}],
    "rejected": [{"role": "assistant", "content": "No."}],
}


@pytest.fixture(scope="module")
def base_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    assert not tok.chat_template  # the fallback template is what these tests exercise
    return tok


@pytest.fixture
def tok(base_tokenizer):
    """A fresh copy per test: render_pair installs the fallback template on the tokenizer it is given."""
    return copy.deepcopy(base_tokenizer)


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def after_prompt(tok, prompt, completion, special=True):
    """The ids prompt + completion adds after the prompt's own ids (which must be a prefix of them)."""
    head, whole = ids(tok, prompt, special), ids(tok, prompt + completion, special)
    assert whole[:len(head)] == head
    return whole[len(head):]


def prepare(raw, tok, max_length=128, max_prompt_length=64):
    return prepare_record(raw, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                          eos_id=tok.eos_token_id)


def with_(base, **fields):
    row = copy.deepcopy(base)
    row.update(fields)
    return row


# --------------------------------------------------------------------------------------------------
# Bad rows
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, reason", [
    ('{"prompt": "p", "chosen": ', "invalid JSON"),
    ("not json at all", "invalid JSON"),
    (b"\xff\xfe{", "invalid JSON"),
    ('["p", "c", "r"]', "must be a JSON object, got list"),
    ('"just a string"', "must be a JSON object, got str"),
    ("42", "must be a JSON object, got int"),
])
def test_unparseable_rows(raw, reason):
    with pytest.raises(RowError, match=reason):
        parse_record(raw)


def test_parse_record_accepts_json_and_dicts():
    assert parse_record(json.dumps(STANDARD)) == STANDARD
    assert parse_record(json.dumps(STANDARD).encode()) == STANDARD
    assert parse_record(STANDARD) is STANDARD


M = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "c", "rejected": "r"}, "missing field 'prompt'"),
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "missing field 'rejected'"),
    (with_(STANDARD, chosen=""), "field 'chosen' is empty"),
    (with_(STANDARD, prompt="  \n\t"), "field 'prompt' is empty"),
    (with_(STANDARD, rejected=3), "field 'rejected' must be a string or a list of messages, got int"),
    (with_(STANDARD, prompt={"text": "p"}), "field 'prompt' must be a string or a list of messages, got dict"),
    (with_(CONVO, chosen=[]), "field 'chosen' is an empty list of messages"),
    (with_(CONVO, chosen=[{"role": "assistant"}]), "field 'chosen' message 0 is not a {role, content} object"),
    (with_(CONVO, prompt=M + [{"content": "x"}]), "field 'prompt' message 1 is not a {role, content} object"),
    (with_(CONVO, prompt=["hi"]), "field 'prompt' message 0 is not a {role, content} object"),
    (with_(CONVO, rejected=[{"role": "assistant", "content": 5}]), "message 0 has a non-string role or content"),
    (with_(CONVO, rejected=[{"role": "assistant", "content": " "}]), "field 'rejected' message 0 has empty content"),
    (with_(CONVO, prompt="Tell me a story."), "fields mix plain strings and message lists"),
    (with_(STANDARD, rejected=[{"role": "assistant", "content": "No."}]), "fields mix plain strings"),
    (with_(STANDARD, rejected=STANDARD["chosen"]), "chosen and rejected are identical"),
    (with_(CONVO, rejected=CONVO["chosen"]), "chosen and rejected are identical"),
])
def test_invalid_pairs(row, reason):
    with pytest.raises(RowError) as info:
        validate_pair(row)
    assert reason in str(info.value)


def test_valid_pairs_report_their_format():
    assert validate_pair(STANDARD) == "standard"
    assert validate_pair(CONVO) == "conversational"


@pytest.mark.parametrize("field, value", [
    ("score_chosen", math.nan), ("score_chosen", math.inf), ("score_rejected", -math.inf),
    ("score_chosen", "0.5"), ("score_rejected", True), ("score_chosen", [1.0]),
])
def test_scores_must_be_finite_numbers(field, value):
    both = {"score_chosen": 1.0, "score_rejected": 0.0, field: value}
    with pytest.raises(RowError, match=f"field '{field}' must be a finite number"):
        validate_scores(with_(STANDARD, **both))


@pytest.mark.parametrize("given, missing", [("score_chosen", "score_rejected"), ("score_rejected", "score_chosen")])
def test_one_score_without_the_other_is_rejected(given, missing):
    with pytest.raises(RowError, match=f"'{given}' is given but '{missing}' is missing"):
        validate_scores(with_(STANDARD, **{given: 1.0}))


def test_finite_or_absent_scores_are_fine():
    assert validate_scores(with_(STANDARD, score_chosen=9, score_rejected=-1.5)) == [9.0, -1.5]
    assert validate_scores(with_(STANDARD, score_chosen=None, score_rejected=None)) == []
    assert validate_scores(STANDARD) == []


def test_scored_pair_carries_its_rewards(tok):
    pair = prepare(json.dumps(with_(STANDARD, score_chosen=8.5, score_rejected=3)), tok)
    assert pair.rewards == [8.5, 3.0] and pair.responses_ids == [] and (pair.chosen_index, pair.rejected_index) == (0, 1)
    assert prepare(json.dumps(STANDARD), tok).rewards == []


GROUP = {"prompt": "Name a colour.", "responses": [" Blue.", " I will not.", " Red, or maybe blue."],
         "rewards": [7.0, 1.0, 9.0]}


def test_k_response_row_binarises_to_best_and_worst(tok):
    """rewards [7, 1, 9]: chosen = responses[2] (9), rejected = responses[1] (1); all three are kept."""
    pair = prepare(json.dumps(GROUP), tok)
    assert len(pair.responses_ids) == 3 and pair.rewards == [7.0, 1.0, 9.0]
    assert (pair.chosen_index, pair.rejected_index) == (2, 1)
    assert pair.chosen_ids == pair.responses_ids[2] and pair.rejected_ids == pair.responses_ids[1]
    assert all(ids[-1] == tok.eos_token_id for ids in pair.responses_ids)
    for got, text in zip(pair.responses_ids, GROUP["responses"], strict=True):
        assert pair.prompt_ids + got[:-1] == ids(tok, GROUP["prompt"] + text, special=True)


def test_conversational_k_response_row(tok):
    row = {"prompt": [{"role": "user", "content": "Hi"}],
           "responses": [[{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go away."}]],
           "rewards": [1, 0]}
    pair = prepare(json.dumps(row), tok)
    assert tok.decode(pair.chosen_ids).startswith("Hello!") and tok.decode(pair.rejected_ids).startswith("Go away.")


@pytest.mark.parametrize("change, reason", [
    ({"rewards": None}, "missing field 'rewards'"),
    ({"rewards": [1.0, 2.0]}, "must be a list of 3 numbers"),
    ({"rewards": [1.0, math.nan, 2.0]}, "rewards[1] must be a finite number"),
    ({"rewards": [1.0, "2", 2.0]}, "rewards[1] must be a finite number"),
    ({"rewards": [2.0, 2.0, 2.0]}, "all rewards are equal"),
    ({"responses": ["only one"], "rewards": [1.0]}, "at least 2 completions"),
    ({"responses": ["a", "", "c"]}, "field 'responses[1]' is empty"),
    ({"responses": ["a", [{"role": "assistant", "content": "b"}], "c"]}, "mix plain strings and message lists"),
    ({"chosen": "x"}, "either 'chosen'/'rejected' or 'responses'/'rewards'"),
])
def test_invalid_k_response_rows(tok, change, reason):
    row = {**GROUP, **change}
    with pytest.raises(RowError) as info:
        prepare(json.dumps(row), tok)
    assert reason in str(info.value)


def test_prepare_record_surfaces_every_check(tok):
    """The one entry point of the ingest pass raises the parse, field and score errors."""
    with pytest.raises(RowError, match="invalid JSON"):
        prepare("{", tok)
    with pytest.raises(RowError, match="missing field 'chosen'"):
        prepare('{"prompt": "p", "rejected": "r"}', tok)
    with pytest.raises(RowError, match="'score_chosen' must be a finite number"):
        # json writes NaN, reads it back
        prepare(json.dumps(with_(STANDARD, score_chosen=math.nan, score_rejected=1.0)), tok)
    with pytest.raises(RowError, match="'score_rejected' is missing"):
        prepare(json.dumps(with_(STANDARD, score_chosen=1.0)), tok)


# --------------------------------------------------------------------------------------------------
# Rendering and tokenisation with a real tokenizer
# --------------------------------------------------------------------------------------------------
def test_standard_row_gets_bos_prompt_and_eos_completions(tok):
    """prompt + completion is tokenised whole (BOS first) and the completion gets exactly one EOS."""
    pair = prepare(json.dumps(STANDARD), tok)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    assert pair.prompt_ids[0] == bos
    assert pair.prompt_ids == ids(tok, STANDARD["prompt"], special=True)
    for got, text in ((pair.chosen_ids, STANDARD["chosen"]), (pair.rejected_ids, STANDARD["rejected"])):
        assert pair.prompt_ids + got == ids(tok, STANDARD["prompt"] + text, special=True) + [eos]
        assert got.count(eos) == 1 and got[-1] == eos
        assert bos not in got
    assert tok.decode(pair.prompt_ids + pair.chosen_ids[:-1], skip_special_tokens=True) == (
        STANDARD["prompt"] + STANDARD["chosen"])


def test_standard_completion_that_ends_with_eos_gets_no_second_one(tok):
    """As TRL: the EOS is added only to a completion that does not already end with it."""
    pair = prepare(with_(STANDARD, chosen=STANDARD["chosen"] + tok.eos_token), tok)
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.chosen_ids.count(tok.eos_token_id) == 1
    assert pair.chosen_ids == prepare(STANDARD, tok).chosen_ids


def test_completion_gains_no_word_start_the_model_never_sees(tok):
    """Zephyr's template: the generation prompt ends "<|assistant|>\\n" and the answer follows directly.
    Tokenised alone, the answer "there ..." would start with SentencePiece's word-start "▁there", which
    never follows that newline in the conversation the model reads; taken from the whole conversation's
    ids, prompt + completion is exactly that conversation."""
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    row = {"prompt": [{"role": "user", "content": "Once upon a time"}],
           "chosen": [{"role": "assistant", "content": "there was a cat"}],
           "rejected": [{"role": "assistant", "content": "the dog ran"}]}
    pair = prepare(row, tok)
    whole = ids(tok, tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False))
    assert pair.prompt_ids + pair.chosen_ids == whole
    assert tok.convert_tokens_to_ids("▁there") not in pair.chosen_ids


def test_chosen_and_rejected_share_the_prompt_ids_when_a_token_straddles_the_joint(tok):
    """The prompt ends with its separator: alone, its trailing space is a token ("▁"); before a word it
    is that word's start ("▁there"). The prompt is the longest prefix of its ids that every whole text
    shares, and each completion is the rest of its own ids."""
    row = {"prompt": "Once upon a time ", "chosen": "there was", "rejected": "a dog ran"}
    pair = prepare(row, tok)
    for got, text in ((pair.chosen_ids, row["chosen"]), (pair.rejected_ids, row["rejected"])):
        assert pair.prompt_ids + got[:-1] == ids(tok, row["prompt"] + text, special=True)
    assert pair.prompt_ids == ids(tok, "Once upon a time", special=True)  # without the lone "▁"
    assert pair.chosen_ids[0] == tok.convert_tokens_to_ids("▁there")


def test_standard_fields_that_meet_without_a_separator_are_not_glued(tok):
    """UltraFeedback's layout: "...in the oven" + "To cook...". Read whole, "ovenTo" would be one word
    (TRL's reading); the completion is tokenised alone instead, so it starts at a token boundary."""
    row = {"prompt": "how to cook in the oven", "chosen": "To cook it", "rejected": "No."}
    pair = prepare(row, tok)
    assert pair.prompt_ids == ids(tok, row["prompt"], special=True)
    assert pair.chosen_ids == ids(tok, row["chosen"]) + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, row["rejected"]) + [tok.eos_token_id]
    glued = ids(tok, row["prompt"] + row["chosen"], special=True)
    assert pair.prompt_ids + pair.chosen_ids[:-1] != glued


def test_conversational_row_uses_the_fallback_template(tok):
    rendered = render_pair(CONVO, "conversational", tok)
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    assert rendered.templated
    assert rendered.prompt == "<s>user: Tell me a story.\nassistant:"  # BOS, like standard prompts get
    # the assistant turn is closed by the EOS token, as text; the space before the answer is the completion's
    assert rendered.chosen == " Once upon a time there was a cat.</s>\n"
    assert rendered.rejected == " No.</s>\n"


def test_conversational_row_tokens(tok):
    """Templated text is tokenised without added special tokens; prompt + completion is exactly the
    whole rendered conversation's ids (no "▁" the model never sees at the joint), for chosen and for
    rejected with the same prompt ids, and the one EOS is the template's."""
    pair = prepare(CONVO, tok)
    eos = tok.eos_token_id
    assert pair.prompt_ids == ids(tok, "<s>user: Tell me a story.\nassistant:")
    assert pair.prompt_ids[0] == tok.bos_token_id and pair.prompt_ids.count(tok.bos_token_id) == 1
    for got, answer in ((pair.chosen_ids, CONVO["chosen"]), (pair.rejected_ids, CONVO["rejected"])):
        whole = tok.apply_chat_template(CONVO["prompt"] + answer, tokenize=False)
        assert pair.prompt_ids + got == ids(tok, whole)
        assert got.count(eos) == 1 and got[-2:] == [eos, tok.convert_tokens_to_ids("<0x0A>")]
    assert pair.chosen_ids[0] == tok.convert_tokens_to_ids("▁Once")
    assert tok.decode(pair.chosen_ids) == "Once upon a time there was a cat.</s>\n"


def test_fallback_template_without_an_eos_token_closes_turns_with_the_newline_alone(tok):
    tok.eos_token = None
    rendered = render_pair(CONVO, "conversational", tok)
    assert rendered.prompt == "<s>user: Tell me a story.\nassistant:"
    assert rendered.chosen == " Once upon a time there was a cat.\n"


def test_templated_completion_that_ends_with_eos_gets_no_second_one(tok):
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    pair = prepare(CONVO, tok)
    eos = tok.eos_token_id
    for got in (pair.chosen_ids, pair.rejected_ids):
        assert got[-1] == eos and got.count(eos) == 1


def test_multi_turn_prompt_keeps_history(tok):
    row = with_(CONVO, prompt=[
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "A story?"},
    ])
    rendered = render_pair(row, "conversational", tok)
    assert rendered.prompt == "<s>system: Be kind.\nuser: Hi\nassistant: Hello!</s>\nuser: A story?\nassistant:"
    assert rendered.chosen == " Once upon a time there was a cat.</s>\n"


def test_tokenizer_with_its_own_chat_template_is_used(tok):
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    mine = tok.chat_template
    rendered = render_pair(CONVO, "conversational", tok)
    assert tok.chat_template == mine  # not replaced by the fallback
    assert rendered.prompt == "<|user|>Tell me a story.<|end|><|assistant|>"
    assert rendered.chosen == "<|assistant|>Once upon a time there was a cat.<|end|>"[len("<|assistant|>"):]
    assert rendered.rejected == "No.<|end|>"
    pair = prepare(CONVO, tok)
    assert pair.prompt_ids == ids(tok, rendered.prompt)
    assert pair.chosen_ids == after_prompt(tok, rendered.prompt, rendered.chosen, special=False)
    assert tok.eos_token_id not in pair.chosen_ids  # the template closes the turn ("<|end|>"): no EOS added


def test_a_chat_template_that_raises_quarantines_the_row(tok):
    """Gemma's and Mistral's templates raise_exception() on a system message or on roles that do not
    alternate: a RowError (the row is quarantined), not an exception that ends the ingest."""
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = with_(CONVO, prompt=[{"role": "system", "content": "Be kind."}] + CONVO["prompt"])
    with pytest.raises(RowError, match="the chat template failed on this row: System role not supported"):
        prepare(row, tok)
    tok.chat_template = "{{ (messages | length) // 0 }}"  # any other exception while rendering, too
    with pytest.raises(RowError, match="the chat template failed on this row: .*division"):
        prepare(CONVO, tok)


def test_template_whose_generation_prompt_is_not_a_prefix_is_refused(tok):
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    with pytest.raises(RowError, match="does not render 'chosen' as a continuation of the prompt"):
        prepare(CONVO, tok)


def test_prompt_truncated_from_the_left(tok):
    """A long prompt keeps its last max_prompt_length ids (the end, next to the answer)."""
    prompt = " ".join(f"word{i}" for i in range(60))
    full = ids(tok, prompt, special=True)
    assert len(full) > 20
    pair = prepare(with_(STANDARD, prompt=prompt), tok, max_length=200, max_prompt_length=20)
    assert pair.prompt_ids == full[-20:]
    # room enough: untouched
    assert pair.chosen_ids == after_prompt(tok, prompt, STANDARD["chosen"]) + [tok.eos_token_id]


def test_completions_truncated_from_the_right_to_fit_max_length(tok):
    chosen = " Once upon a time there was a cat who liked to sleep in the warm sun all day long."
    rejected = " The dog ran far away into the woods and never came back to the little house again."
    row = with_(STANDARD, chosen=chosen, rejected=rejected)
    max_length, max_prompt_length = 24, 8
    pair = prepare(row, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    prompt_full = ids(tok, STANDARD["prompt"], special=True)
    assert pair.prompt_ids == prompt_full[-max_prompt_length:]
    room = max_length - len(pair.prompt_ids)
    for got, text in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
        assert len(pair.prompt_ids) + len(got) == max_length
        assert got == (after_prompt(tok, STANDARD["prompt"], text) + [tok.eos_token_id])[:room]  # keeps the start
        assert tok.eos_token_id not in got  # EOS was cut along with the tail


def test_short_prompt_is_not_padded_and_completion_gets_the_rest(tok):
    pair = prepare(STANDARD, tok, max_length=20, max_prompt_length=16)
    prompt_full = ids(tok, STANDARD["prompt"], special=True)
    assert len(prompt_full) < 16 and pair.prompt_ids == prompt_full
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 20


def test_nothing_left_of_the_completion(tok):
    """With max_prompt_length == max_length (refused by the config, possible here) a long prompt
    fills the whole budget and the completion is empty: a RowError, not an empty sequence."""
    rendered = RenderedPair("one two three four five six seven eight nine ten", "yes", "no", templated=False)
    assert len(ids(tok, rendered.prompt, special=True)) > 6
    with pytest.raises(RowError, match=r"nothing left of 'chosen' after truncation to max_length=6"):
        tokenize_pair(rendered, tok, max_length=6, max_prompt_length=6, eos_id=tok.eos_token_id)


def test_pair_identical_after_truncation(tok):
    """Chosen and rejected that differ only beyond max_length cannot be trained on."""
    common = "Once upon a time there was a little cat who lived in a big red house by the sea"
    row = with_(STANDARD, chosen=common + " and it was happy.", rejected=common + " and it was sad.")
    with pytest.raises(RowError) as info:
        prepare(row, tok, max_length=20, max_prompt_length=8)
    assert "identical after truncation to max_length=20" in str(info.value)
    assert "data.max_length" in str(info.value)
    pair = prepare(row, tok, max_length=200, max_prompt_length=8)  # with room they differ
    assert pair.chosen_ids != pair.rejected_ids


def test_empty_prompt_tokens_are_refused(tok):
    rendered = RenderedPair("", "yes", "no", templated=True)  # templated: no BOS added either
    with pytest.raises(RowError, match="prompt tokenises to nothing"):
        tokenize_pair(rendered, tok, max_length=16, max_prompt_length=8, eos_id=tok.eos_token_id)


@pytest.mark.parametrize("raw, fragment", [
    ('{"q": null}', "is missing"),
    ('{"other": 1}', "is missing"),
    ('{"q": "high"}', "not a finite number"),
    ('{"q": true}', "not a finite number"),
    ('{"q": NaN}', "not a finite number"),
    ('[1, 2]', "is missing"),
])
def test_user_score_refuses_rows_without_a_finite_number(raw, fragment):
    from sdpo.rows import RowError, user_score

    with pytest.raises(RowError, match=fragment):
        user_score(raw, "q")


def test_user_score_reads_ints_and_floats():
    from sdpo.rows import user_score

    assert user_score('{"q": 3}', "q") == 3.0 and user_score('{"q": -0.25}', "q") == -0.25
