"""Preference rows: parse, validate, render and tokenise. Pure Python, no Ray.

TRL's two formats are accepted:
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                   where a message is {"role": str, "content": str}.
Pairs may carry explicit rewards, `score_chosen` and `score_rejected` (both or neither), for the
reward-aware losses. A K-response row, {"prompt", "responses": [K completions], "rewards": [K numbers]}
(K >= 2, either format), feeds the listwise losses (InfoNCA, NCA); the pairwise losses see its binarised
pair: the highest-reward response as chosen, the lowest as rejected.

Other column names and layouts map onto these with a source's `RowMapping` (`columns:` renames,
a `system` column that becomes the conversation's system message, and TRL's implicit-prompt format,
where chosen and rejected are whole conversations that begin with the same prompt turns).

Conversational rows are rendered with the tokenizer's chat template; a tokenizer without one gets
`FALLBACK_CHAT_TEMPLATE` (documented in the README). The completion is whatever the rendered
conversation adds after the rendered prompt with its generation prompt.

Tokenisation follows TRL's DPOTrainer: the prompt text and each prompt + completion text are tokenised
whole (a completion tokenised alone would start with tokens the model never sees after that prompt,
such as SentencePiece's "▁" word-start marker), the prompt ids are the longest prefix the prompt's ids
share with every prompt + completion (so chosen and rejected, or all K responses, share exactly the
same prompt tokens) and each completion is the rest of its ids. Standard text whose prompt and
completion meet without whitespace (UltraFeedback's fields) is not glued into one word: its completion is
tokenised alone, from a token boundary. Standard completions get an EOS unless
they already end with one; a conversational completion ends as the chat template closes the turn.

Truncation keeps pairs comparable: the prompt is cut from the left (its end, next to the answer, is
kept), completions from the right, and both completions get the same prompt.

A row that cannot be used raises `RowError(reason)`; the ingest pass turns that into a quarantined
row with its source, file and line — never a silent drop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

# BOS, then "{role}: {content}" per line, an assistant's content closed by the EOS token (as text, when
# the tokenizer has one; like Zephyr's template), and "assistant:" as the generation prompt. A completion
# is then " {content}{eos}\n": the generation prompt ends before the space, so that with SentencePiece
# tokenizers the prompt's tokens are a prefix of the whole conversation's ("▁word" starts the answer).
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' and eos_token else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class RowError(ValueError):
    """A row that cannot be trained on; the message is the quarantine reason."""


@dataclass(frozen=True)
class RenderedPair:
    prompt: str
    chosen: str
    rejected: str
    templated: bool  # True when the text came from a chat template (it carries its own BOS, if any)


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    responses_ids: list[list[int]] = dataclasses.field(default_factory=list)  # K-response rows only (chosen/rejected among them)
    rewards: list[float] = dataclasses.field(default_factory=list)  # K rewards, or [score_chosen, score_rejected]; [] if none
    chosen_index: int = 0  # where chosen/rejected sit in the row's group (responses, or [chosen, rejected])
    rejected_index: int = 1


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------
def parse_record(raw: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """The row as a dict without its null fields: a null is an absent field (a Parquet file that mixes
    pairs and K-response rows has null `responses` in its pairs and null `chosen` in its groups)."""
    if isinstance(raw, dict):
        record = raw
    else:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RowError(f"invalid JSON: {err.msg if hasattr(err, 'msg') else err}") from None
        if not isinstance(record, dict):
            raise RowError(f"a row must be a JSON object, got {type(record).__name__}")
    if any(v is None for v in record.values()):
        record = {k: v for k, v in record.items() if v is not None}
    return record


@dataclass(frozen=True)
class RowMapping:
    """How a source's rows become TRL rows, before validation.

    - `columns`: our field -> the file's column (`{prompt: question}`); `system` may name a column
      whose text becomes a system message: a string prompt becomes the conversation [system, user: prompt]
      and string completions become assistant messages (Intel/orca_dpo_pairs' layout); a prompt that is
      already a conversation gets it as its first message (a RowError if it has a system message too);
    - `implicit_prompt`: chosen and rejected are whole conversations; the prompt is their shared
      leading messages and any prompt column is ignored. Rows without a prompt field whose chosen and
      rejected are message lists are read this way anyway (as TRL does).
    """

    columns: tuple[tuple[str, str], ...] = ()
    implicit_prompt: bool = False

    def column(self, field: str) -> str:
        return dict(self.columns).get(field, field)

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.columns:
            renamed = {ours: record[theirs] for ours, theirs in self.columns if theirs in record}
            taken = {theirs for _, theirs in self.columns}
            record = {k: v for k, v in record.items() if k not in taken} | renamed
        if "responses" not in record and (self.implicit_prompt or record.get("prompt") is None):
            record = _split_implicit_prompt(record, explicit=self.implicit_prompt)
        if "system" in dict(self.columns):  # after the split: an implicit prompt gets the system message too
            record = _with_system(record, self.column("system"))
        return record


def _with_system(record: dict[str, Any], column: str) -> dict[str, Any]:
    record = dict(record)
    system, prompt = record.pop("system", None), record.get("prompt")
    if system is not None and not isinstance(system, str):
        raise RowError(f"field 'system' (column '{column}') must be a string, got {type(system).__name__}")
    system = system if system and system.strip() else None
    if isinstance(prompt, list):  # already a conversation: the system message goes first
        if system is None:
            return record
        if any(isinstance(m, dict) and m.get("role") == "system" for m in prompt):
            raise RowError(f"two system messages: the '{column}' column (mapped to 'system') and one in the "
                           "prompt's messages; give the system message in one place")
        return dict(record, prompt=[{"role": "system", "content": system}] + prompt)
    if not isinstance(prompt, str):
        return record  # missing or of the wrong type: validation names it
    messages = [] if system is None else [{"role": "system", "content": system}]
    out = dict(record, prompt=messages + [{"role": "user", "content": prompt}])
    for field in ("chosen", "rejected"):
        if isinstance(out.get(field), str):
            out[field] = [{"role": "assistant", "content": out[field]}]
    if isinstance(out.get("responses"), list):
        out["responses"] = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r
                            for r in out["responses"]]
    return out


def _split_implicit_prompt(record: dict[str, Any], *, explicit: bool) -> dict[str, Any]:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        if explicit:
            raise RowError("implicit_prompt: 'chosen' and 'rejected' must both be lists of messages")
        return record
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError("no prompt: 'chosen' and 'rejected' share no leading message (implicit-prompt rows "
                       "must start with the same prompt turns); add a 'prompt' field")
    return dict(record, prompt=chosen[:shared], chosen=chosen[shared:], rejected=rejected[shared:])


def _check_messages(field: str, value: list[Any]) -> None:
    if not value:
        raise RowError(f"field '{field}' is an empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowError(f"field '{field}' message {i} is not a {{role, content}} object")
        if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
            raise RowError(f"field '{field}' message {i} has a non-string role or content")
        if not msg["content"].strip():
            raise RowError(f"field '{field}' message {i} has empty content")


def validate_pair(record: dict[str, Any]) -> str:
    """Check a record's fields; return its format, 'standard' or 'conversational'."""
    for field in PAIR_FIELDS:
        if field not in record or record[field] is None:
            raise RowError(f"missing field '{field}'")
    kind = _format_of([(field, record[field]) for field in PAIR_FIELDS])
    if record["chosen"] == record["rejected"]:
        raise RowError("chosen and rejected are identical")
    return kind


def _format_of(fields: list[tuple[str, Any]]) -> str:
    """'standard' (every field a non-empty string) or 'conversational' (every field a message list)."""
    kinds = set()
    for name, value in fields:
        if isinstance(value, str):
            if not value.strip():
                raise RowError(f"field '{name}' is empty")
            kinds.add("standard")
        elif isinstance(value, list):
            _check_messages(name, value)
            kinds.add("conversational")
        else:
            raise RowError(f"field '{name}' must be a string or a list of messages, got {type(value).__name__}")
    if len(kinds) > 1:
        raise RowError("fields mix plain strings and message lists; use one format per row")
    return kinds.pop()


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def validate_scores(record: dict[str, Any]) -> list[float]:
    """Optional explicit rewards of a pair: both `score_chosen` and `score_rejected`, finite, or neither."""
    given = [f for f in ("score_chosen", "score_rejected") if record.get(f) is not None]
    if not given:
        return []
    if len(given) == 1:
        missing = ({"score_chosen", "score_rejected"} - set(given)).pop()
        raise RowError(f"field '{given[0]}' is given but '{missing}' is missing; give both rewards or neither")
    return [_finite(f"field '{f}'", record[f]) for f in ("score_chosen", "score_rejected")]


def validate_group(record: dict[str, Any]) -> tuple[str, list[float]]:
    """Check a K-response row; return its format and its rewards."""
    both = [f for f in ("chosen", "rejected") if f in record]
    if both:
        raise RowError(f"a row has either 'chosen'/'rejected' or 'responses'/'rewards', not both (found {both})")
    prompt, responses = record.get("prompt"), record.get("responses")
    if prompt is None:
        raise RowError("missing field 'prompt'")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError("field 'responses' must be a list of at least 2 completions")
    if "rewards" not in record or record["rewards"] is None:
        raise RowError("missing field 'rewards' (a K-response row needs one reward per response)")
    rewards = record["rewards"]
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        n = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise RowError(f"field 'rewards' must be a list of {len(responses)} numbers (one per response), got {n}")
    rewards = [_finite(f"rewards[{i}]", r) for i, r in enumerate(rewards)]
    if max(rewards) == min(rewards):
        raise RowError("all rewards are equal: the row states no preference")
    kind = _format_of([("prompt", prompt)] + [(f"responses[{i}]", r) for i, r in enumerate(responses)])
    return kind, rewards


# --------------------------------------------------------------------------------------------------
# Rendering and tokenisation
# --------------------------------------------------------------------------------------------------
def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # jinja2's TemplateError (a template's raise_exception: "System role not
        # supported", roles that do not alternate), or whatever else a template raises on this row
        raise RowError(f"the chat template failed on this row: {err}") from None


def render_completions(prompt: Any, completions: dict[str, Any], kind: str, tokenizer: Any) -> tuple[str, list[str]]:
    """The prompt's text and each completion's text (what the conversation adds after the prompt)."""
    if kind == "standard":
        return prompt, list(completions.values())
    ensure_chat_template(tokenizer)
    text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    out = []
    for name, messages in completions.items():
        full = _apply_template(tokenizer, prompt + messages)
        if not full.startswith(text):
            raise RowError(
                f"the chat template does not render '{name}' as a continuation of the prompt; "
                "set a template whose generation prompt is a prefix of the assistant turn"
            )
        out.append(full[len(text):])
    return text, out


def render_pair(record: dict[str, Any], kind: str, tokenizer: Any) -> RenderedPair:
    prompt, (chosen, rejected) = render_completions(
        record["prompt"], {"chosen": record["chosen"], "rejected": record["rejected"]}, kind, tokenizer)
    return RenderedPair(prompt, chosen, rejected, templated=kind != "standard")


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize(prompt: str, completions: dict[str, str], templated: bool, tokenizer: Any, *, max_length: int,
              max_prompt_length: int, eos_id: int) -> tuple[list[int], list[list[int]]]:
    # Templated text already carries the model's special tokens (BOS among them) as text; standard text
    # gets the tokenizer's (BOS) on the prompt, and so at the start of prompt + completion.
    special = not templated
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    if not prompt_ids:
        raise RowError("prompt tokenises to nothing")
    # Each completion tokenised after its prompt, as the model reads it; where a token straddles the
    # joint (or a tokenizer adds an EOS to the prompt alone) the completion starts where the ids diverge.
    # Standard text that meets without whitespace ("...the oven" + "To cook...", UltraFeedback's
    # layout) is two fields, not one word: the completion starts at a token boundary, tokenised alone.
    whole = {name: tokenizer(prompt + text, add_special_tokens=special)["input_ids"]
             if templated or prompt[-1:].isspace() or text[:1].isspace()
             else prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"]
             for name, text in completions.items()}
    shared = min(_common_prefix_length(prompt_ids, ids) for ids in whole.values())
    if shared == 0:
        raise RowError("the prompt shares no leading token with prompt + completion tokenised together")
    prompt_ids = prompt_ids[:shared][-max_prompt_length:]  # keep the end, next to the answer
    room = max_length - len(prompt_ids)
    out = []
    for name, ids in whole.items():
        ids = ids[shared:]
        if not templated and ids[-1:] != [eos_id]:  # a chat template closes its turns itself
            ids = ids + [eos_id]
        if not ids:
            raise RowError(f"'{name}' tokenises to nothing after the prompt")
        ids = ids[:room]
        if len(ids) == 0:
            raise RowError(f"nothing left of '{name}' after truncation to max_length={max_length}")
        out.append(ids)
    return prompt_ids, out


def _distinct(chosen: list[int], rejected: list[int], max_length: int, what: str = "chosen and rejected") -> None:
    if chosen == rejected:
        raise RowError(
            f"{what} are identical after truncation to max_length={max_length} "
            "(they differ only beyond it); raise data.max_length"
        )


def tokenize_pair(
    pair: RenderedPair, tokenizer: Any, *, max_length: int, max_prompt_length: int, eos_id: int
) -> TokenizedPair:
    prompt_ids, (chosen, rejected) = _tokenize(
        pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, pair.templated, tokenizer,
        max_length=max_length, max_prompt_length=max_prompt_length, eos_id=eos_id)
    _distinct(chosen, rejected, max_length)
    return TokenizedPair(prompt_ids, chosen, rejected)


def prepare_group(record: dict[str, Any], tokenizer: Any, *, max_length: int, max_prompt_length: int,
                  eos_id: int) -> TokenizedPair:
    """A K-response row -> token ids; chosen/rejected are its highest- and lowest-reward responses."""
    kind, rewards = validate_group(record)
    names = {f"responses[{i}]": r for i, r in enumerate(record["responses"])}
    prompt, texts = render_completions(record["prompt"], names, kind, tokenizer)
    prompt_ids, ids = _tokenize(prompt, dict(zip(names, texts, strict=True)), kind != "standard", tokenizer,
                                max_length=max_length, max_prompt_length=max_prompt_length, eos_id=eos_id)
    best, worst = int(max(range(len(rewards)), key=rewards.__getitem__)), int(min(range(len(rewards)), key=rewards.__getitem__))
    _distinct(ids[best], ids[worst], max_length, "the highest- and lowest-reward responses")
    return TokenizedPair(prompt_ids, ids[best], ids[worst], responses_ids=ids, rewards=rewards,
                         chosen_index=best, rejected_index=worst)


def prepare_record(
    raw: str | bytes | dict[str, Any], tokenizer: Any, *, max_length: int, max_prompt_length: int, eos_id: int,
    mapping: RowMapping | None = None,
) -> TokenizedPair:
    """Raw row (a pair or a K-response row) -> token ids, or RowError with the reason."""
    record = parse_record(raw)
    if mapping is not None:
        record = mapping.apply(record)
    if "responses" in record:
        return prepare_group(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                             eos_id=eos_id)
    kind = validate_pair(record)
    rewards = validate_scores(record)
    rendered = render_pair(record, kind, tokenizer)
    pair = tokenize_pair(
        rendered, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, eos_id=eos_id
    )
    return TokenizedPair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, rewards=rewards) if rewards else pair


def user_score(raw: str, field: str) -> float:
    """The numeric score a row carries in `field` (partitioning.score_field); RowError if absent or not a
    finite number, so that the row is quarantined with the reason rather than ordered arbitrarily."""
    import json
    import math

    try:
        row = json.loads(raw)
    except ValueError:
        raise RowError(f"score field {field!r}: the row is not a JSON object") from None
    value = row.get(field) if isinstance(row, dict) else None
    if value is None:
        raise RowError(f"score field {field!r} is missing (partitioning.score_field)")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowError(f"score field {field!r} is not a finite number: {value!r}")
    return float(value)
