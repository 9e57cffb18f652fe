"""The teachers of a job's distill stages, made ready before any actor starts: each one's prompt for
every training item, the checks that it can score the student's tokens, and its Ray actor.

The teacher's prompt is the item's with the stage's context added -- `teacher.system_prompt`,
then the `teacher.few_shot` conversations, then the item's own messages -- rendered by the
teacher's chat template with the generation prompt (a plain `prompt` item: the context as plain
text before the prompt). The student never sees that context; its completion ids are scored
after the teacher's prompt as they are, so both tokenizers must give the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.logs import log_to_file
from core.model_store import resolve_model_path
from learner.teacher import Teacher
from services.config import JobConfig, TeacherConfig
from services.orchestrator.data import DatasetError, check_messages, item_prompt_ids, json_lines

FEW_SHOT_ROLES = ("user", "assistant")  # a system prompt is teacher.system_prompt
# Digits, code, whitespace runs and non-ASCII: where tokenizers that share a vocabulary size differ.
TOKENIZER_PROBE = "The answer: 12 + 30 = 42.\n\tdef f(x):  return x ** 2  # naïve café, 東京 🙂"


@dataclass(frozen=True)
class TeacherInputs:
    model_path: Path
    prompt_ids: dict[str, list[int]]  # train item id -> the teacher's prompt token ids


def prepare_teachers(
    cfg: JobConfig, model_path: Path, student_tokenizer, train_items: list[dict]
) -> dict[int, TeacherInputs]:
    """Stage index -> its teacher's inputs, for every distill stage."""
    return {
        index: prepare_teacher(
            f"stages[{index}].teacher",
            stage.teacher,
            model_path,
            student_tokenizer,
            train_items,
            cfg.rollout.max_new_tokens,
        )
        for index, stage in enumerate(cfg.stages or [])
        if stage.kind == "distill"
    }


def prepare_teacher(
    field: str,
    teacher: TeacherConfig,
    job_model: Path,
    student_tokenizer,
    items: list[dict],
    max_new_tokens: int,
) -> TeacherInputs:
    """`field` (stages[i].teacher) names the config in errors; `job_model`: the student's."""
    from transformers import AutoTokenizer

    model_path = resolve_model_path(teacher.model, f"{field}.model") if teacher.model else job_model
    tokenizer = AutoTokenizer.from_pretrained(model_path) if teacher.model else student_tokenizer
    check_same_token_ids(tokenizer, student_tokenizer, f"{field}.model")
    few_shot = load_few_shot(teacher.few_shot, f"{field}.few_shot") if teacher.few_shot else []
    prompt_ids = {
        item["id"]: item_prompt_ids(teacher_item(item, teacher.system_prompt, few_shot), tokenizer)
        for item in items
    }
    check_context_fits(model_path, prompt_ids, max_new_tokens, f"{field}.model")
    return TeacherInputs(model_path, prompt_ids)


def load_few_shot(path: str, field: str) -> list[list[dict]]:
    """The example conversations of a few-shot JSONL file, rows of {"messages": [...]} of user and
    assistant turns, an assistant turn at least; a bad row names its file, line and field."""
    conversations = []
    for where, row in json_lines(path, what=field):
        messages = row.get("messages")
        if messages is None:
            raise DatasetError(f"{where}: field 'messages' is missing (each row is one example conversation)")
        check_messages(messages, where)
        for i, message in enumerate(messages):
            if message["role"] not in FEW_SHOT_ROLES:
                raise DatasetError(
                    f"{where}: messages[{i}].role is {message['role']!r}: few-shot turns are 'user' or "
                    "'assistant' (a system prompt is teacher.system_prompt)"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DatasetError(f"{where}: field 'messages' has no assistant turn: an example shows an answer")
        conversations.append(messages)
    if not conversations:
        raise DatasetError(f"{field}: {path} has no conversations")
    return conversations


def teacher_item(item: dict[str, Any], system_prompt: str | None, few_shot: list[list[dict]]) -> dict:
    """The item as the teacher reads it: its context before the item's own prompt."""
    if item.get("messages") is not None:
        return {**item, "messages": teacher_messages(item["messages"], system_prompt, few_shot)}
    examples = ["\n".join(m["content"] for m in conversation) for conversation in few_shot]
    return {**item, "prompt": "\n\n".join([*filter(None, [system_prompt]), *examples, item["prompt"]])}


def teacher_messages(messages: list[dict], system_prompt: str | None, few_shot: list[list[dict]]) -> list:
    """[system] + the few-shot turns + the item's messages. An item's own leading system message
    stays first (templates read only a first one), after the teacher's system prompt."""
    own_system = [m["content"] for m in messages[:1] if m["role"] == "system"]
    system = "\n\n".join([*filter(None, [system_prompt]), *own_system])
    context = [{"role": "system", "content": system}] if system else []
    return context + [m for conversation in few_shot for m in conversation] + messages[len(own_system) :]


def check_same_token_ids(teacher_tokenizer, student_tokenizer, field: str) -> None:
    """The teacher scores the student's token ids: they must mean the same text to it."""
    teacher_ids = teacher_tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    student_ids = student_tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if len(teacher_tokenizer) != len(student_tokenizer) or teacher_ids != student_ids:
        raise ConfigError(
            f"{field}: the teacher's tokenizer is not the student's ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens; {TOKENIZER_PROBE!r} -> {teacher_ids[:8]}... vs "
            f"{student_ids[:8]}...): it scores the student's token ids, so both must share one vocabulary"
        )


def check_context_fits(
    model_path: Path, prompt_ids: dict[str, list[int]], max_new_tokens: int, field: str
) -> None:
    """The longest teacher prompt plus the longest completion within the teacher's positions."""
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    item_id, longest = max(prompt_ids.items(), key=lambda pair: len(pair[1]))
    if positions is not None and len(longest) + max_new_tokens > positions:
        raise ConfigError(
            f"{field}: the teacher's prompt of item {item_id} has {len(longest)} tokens, which with "
            f"rollout.max_new_tokens={max_new_tokens} exceeds the teacher's {positions} positions "
            "(fewer or shorter few-shot examples)"
        )


class TeacherActor(Teacher):
    """A Teacher in a Ray actor of its own (not the learner's process), its output in the job's
    log files like every actor's."""

    def __init__(self, log_name: str, model_path: str, **teacher_kwargs):
        log_to_file(log_name)  # before the model loads and prints
        super().__init__(model_path, **teacher_kwargs)


def start_teacher(cfg: JobConfig, index: int, inputs: TeacherInputs):
    """The actor of stage `index`'s teacher (a handle; its model loads in the background)."""
    import ray

    teacher = cfg.stages[index].teacher
    return (
        ray.remote(TeacherActor)
        .options(name=f"{cfg.name}-teacher-{index}", num_cpus=teacher.num_cpus, num_gpus=teacher.num_gpus)
        .remote(
            f"teacher-{index}",
            str(inputs.model_path),
            dtype=cfg.model.dtype,
            device="cuda" if teacher.num_gpus > 0 else "cpu",
            batch_size=teacher.batch_size,
        )
    )
