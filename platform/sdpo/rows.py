"""Preference rows: parse, validate, render and tokenise. Pure Python, no Ray.

TRL's two formats are accepted:
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                   where a message is {"role": str, "content": str}.

Conversational rows are rendered with the tokenizer's chat template; a tokenizer without one gets
`FALLBACK_CHAT_TEMPLATE` (documented in the README). The completion is whatever the rendered
conversation adds after the rendered prompt with its generation prompt, so chosen and rejected share
exactly the same prompt tokens.

Truncation keeps pairs comparable: the prompt is cut from the left (its end, next to the answer, is
kept), completions from the right, and both completions get the same prompt.

A row that cannot be used raises `RowError(reason)`; the ingest pass turns that into a quarantined
row with its source, file and line — never a silent drop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# BOS, then "{role}: {content}" per line and "assistant: " as the generation prompt. Every completion
# then starts right after "assistant: " and ends with a newline, before the EOS token we append.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
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


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------
def parse_record(raw: str | bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RowError(f"invalid JSON: {err.msg if hasattr(err, 'msg') else err}") from None
    if not isinstance(record, dict):
        raise RowError(f"a row must be a JSON object, got {type(record).__name__}")
    return record


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
    kinds = set()
    for field in PAIR_FIELDS:
        value = record[field]
        if isinstance(value, str):
            if not value.strip():
                raise RowError(f"field '{field}' is empty")
            kinds.add("standard")
        elif isinstance(value, list):
            _check_messages(field, value)
            kinds.add("conversational")
        else:
            raise RowError(f"field '{field}' must be a string or a list of messages, got {type(value).__name__}")
    if len(kinds) > 1:
        raise RowError("fields mix plain strings and message lists; use one format per row")
    if record["chosen"] == record["rejected"]:
        raise RowError("chosen and rejected are identical")
    return kinds.pop()


def validate_scores(record: dict[str, Any]) -> None:
    """Optional explicit rewards (`score_chosen`/`score_rejected`) must be finite numbers."""
    for field in ("score_chosen", "score_rejected"):
        if field in record and record[field] is not None:
            value = record[field]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RowError(f"field '{field}' must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Rendering and tokenisation
# --------------------------------------------------------------------------------------------------
def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def render_pair(record: dict[str, Any], kind: str, tokenizer: Any) -> RenderedPair:
    if kind == "standard":
        return RenderedPair(record["prompt"], record["chosen"], record["rejected"], templated=False)
    ensure_chat_template(tokenizer)
    prompt_msgs = record["prompt"]
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    completions = []
    for field in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(prompt_msgs + record[field], tokenize=False)
        if not full.startswith(prompt):
            raise RowError(
                f"the chat template does not render '{field}' as a continuation of the prompt; "
                "set a template whose generation prompt is a prefix of the assistant turn"
            )
        completions.append(full[len(prompt):])
    return RenderedPair(prompt, completions[0], completions[1], templated=True)


def tokenize_pair(
    pair: RenderedPair, tokenizer: Any, *, max_length: int, max_prompt_length: int, eos_id: int
) -> TokenizedPair:
    # Templated text already carries the model's special tokens (BOS among them) as text.
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=not pair.templated)["input_ids"]
    if not prompt_ids:
        raise RowError("prompt tokenises to nothing")
    prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end, next to the answer
    room = max_length - len(prompt_ids)
    out = []
    for field in ("chosen", "rejected"):
        ids = tokenizer(getattr(pair, field), add_special_tokens=False)["input_ids"] + [eos_id]
        ids = ids[:room]
        if len(ids) == 0:
            raise RowError(f"nothing left of '{field}' after truncation to max_length={max_length}")
        out.append(ids)
    if out[0] == out[1]:
        raise RowError(
            f"chosen and rejected are identical after truncation to max_length={max_length} "
            "(they differ only beyond it); raise data.max_length"
        )
    return TokenizedPair(prompt_ids, out[0], out[1])


def prepare_record(
    raw: str | bytes | dict[str, Any], tokenizer: Any, *, max_length: int, max_prompt_length: int, eos_id: int
) -> TokenizedPair:
    """Raw row -> token ids, or RowError with the reason."""
    record = parse_record(raw)
    kind = validate_pair(record)
    validate_scores(record)
    rendered = render_pair(record, kind, tokenizer)
    return tokenize_pair(
        rendered, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, eos_id=eos_id
    )
