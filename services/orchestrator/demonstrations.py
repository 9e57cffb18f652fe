"""Demonstrations for an sft stage: rows of `messages` ending with the assistant turn to learn,
or `prompt` + `completion` (JSONL, parquet or a `datasets` directory, as data.train), tokenized
into a prompt and the completion the loss is on.

- `messages`: the prompt is the chat template's rendering of every message before the last, with
  the generation prompt; the completion is what the template adds for the last (assistant)
  message, end-of-turn included -- the ids the model emits when it answers, and nothing else.
  Earlier assistant turns are context.
- `prompt` + `completion`: plain text, as a job's `prompt` items are generated from: the prompt
  tokenized as it is, the completion after it, then the end-of-sequence token.
A dpo stage's preference pairs: rows of `prompt` (text) or `messages` (the conversation before
the answer), with the `chosen` and the `rejected` answer as text, each answer tokenized as a
demonstration's completion is.
Every row is checked before any actor starts; a bad one names its file, line (or row) and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.orchestrator.data import DatasetError, chat_template_ids, dataset_rows


@dataclass(frozen=True)
class Demonstration:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]  # the tokens the loss is on


def load_demonstrations(path: str, tokenizer, max_prompt_tokens: int) -> list[Demonstration]:
    demonstrations = []
    for where, row in dataset_rows(path):
        prompt_ids, completion_ids = demonstration_ids(row, tokenizer, where)
        if len(prompt_ids) > max_prompt_tokens:
            raise DatasetError(
                f"{where}: the prompt has {len(prompt_ids)} tokens > "
                f"data.max_prompt_tokens={max_prompt_tokens}"
            )
        demonstrations.append(Demonstration(str(row.get("id", where)), prompt_ids, completion_ids))
    if not demonstrations:
        raise DatasetError(f"{path}: no demonstrations")
    return demonstrations


def demonstration_ids(row: dict[str, Any], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a `messages` or `prompt` + `completion` row."""
    if "messages" in row:
        return _chat_ids(_messages(row["messages"], where), tokenizer, where)
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value:
            raise DatasetError(
                f"{where}: field {name!r} must be a non-empty string (a demonstration is 'messages' ending "
                "with an assistant turn, or 'prompt' + 'completion')"
            )
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return prompt_ids, completion_ids + [tokenizer.eos_token_id]


def _messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DatasetError(f"{where}: field 'messages' must be a list of {{'role', 'content'}} objects")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "none"
        raise DatasetError(
            f"{where}: field 'messages' has no assistant turn to learn: the last message must be "
            f"role 'assistant' after at least one other (the last is {last!r})"
        )
    return messages


def _chat_ids(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    prompt_ids = chat_template_ids(tokenizer, messages[:-1], generation_prompt=True)
    whole_ids = chat_template_ids(tokenizer, messages, generation_prompt=False)
    if whole_ids[: len(prompt_ids)] != prompt_ids or len(whole_ids) == len(prompt_ids):
        raise DatasetError(
            f"{where}: the chat template does not render this conversation as its prompt followed by the "
            "assistant turn; give the demonstration as 'prompt' + 'completion' instead"
        )
    return prompt_ids, whole_ids[len(prompt_ids) :]


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def load_preference_pairs(path: str, tokenizer, max_prompt_tokens: int) -> list[PreferencePair]:
    pairs = []
    for where, row in dataset_rows(path):
        if not isinstance(row.get("messages"), list) and not isinstance(row.get("prompt"), str):
            raise DatasetError(
                f"{where}: a preference pair needs 'prompt' (text) or 'messages' (the conversation "
                "before the answer), with 'chosen' and 'rejected'"
            )
        answers = {}
        for side in ("chosen", "rejected"):
            if not isinstance(row.get(side), str) or not row[side]:
                raise DatasetError(f"{where}: field {side!r} must be a non-empty string (the answer)")
            answers[side] = demonstration_ids(_as_demonstration(row, row[side], where), tokenizer, where)
        prompt_ids = answers["chosen"][0]
        if len(prompt_ids) > max_prompt_tokens:
            raise DatasetError(
                f"{where}: the prompt has {len(prompt_ids)} tokens > "
                f"data.max_prompt_tokens={max_prompt_tokens}"
            )
        pair_id = str(row.get("id", where))
        pairs.append(PreferencePair(pair_id, prompt_ids, answers["chosen"][1], answers["rejected"][1]))
    if not pairs:
        raise DatasetError(f"{path}: no preference pairs")
    return pairs


def _as_demonstration(row: dict, answer: str, where: str) -> dict:
    if "messages" not in row:
        return {"prompt": row["prompt"], "completion": answer}
    messages = row["messages"]
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise DatasetError(
            f"{where}: field 'messages' ends with an assistant turn; it is the conversation before "
            "the answer, which 'chosen' and 'rejected' give"
        )
    return {"messages": messages + [{"role": "assistant", "content": answer}]}
