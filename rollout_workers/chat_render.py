"""Token ids of a multi-turn conversation, appended turn by turn, never re-encoding model output.

An episode's context is `prompt_ids` (the first messages rendered by the chat template, with the
generation prompt), then the model's tokens exactly as the engine produced them, then the
*observation delta*: what the template renders after the end of that assistant turn, for the new
messages, up to and including the next generation prompt, tokenized on its own. Re-tokenising
decoded text would give other ids than the ones sampled (and other log-probs); so the model's
tokens are only ever copied.

This is right only for templates that are append-only: the rendering of a conversation with one
more message starts with the rendering without it. `check_append_only` tests it on a sample
conversation once per job; a template that fails (e.g. one that drops earlier reasoning)
raises `TemplateNotAppendOnlyError` before anything runs.

Tools are shown through the template (`tools=` of `apply_chat_template`) where it renders them;
a template that ignores them (SmolLM2's) gets them in a system message instead, with the call
format the tools environment parses.
"""

from __future__ import annotations

import json

PLACEHOLDER = "\u2063rft-assistant-content\u2063"  # marks where a template puts an assistant's text
# The example call is valid JSON built from the first tool: small models copy placeholders.
TOOL_SYSTEM_PROMPT = (
    "You can call tools. To call one, reply with exactly\n"
    "<tool_call>{example}</tool_call>\n"
    "and wait for its result. When you are done, reply without a tool call.\n"
    "The tools, as JSON schemas:\n{tools}"
)


class TemplateNotAppendOnlyError(ValueError):
    """The chat template re-renders earlier turns differently once a message is added."""


class ChatRenderer:
    def __init__(self, tokenizer, tools: list[dict] | None = None, name: str = "the model"):
        self.tokenizer, self.tools, self.name = tokenizer, tools or None, name
        self.template_shows_tools = bool(self.tools) and self._renders_tools()
        # What the template writes after an assistant message's text (e.g. "<|im_end|>\n").
        rendered = self._render([{"role": "user", "content": "x"}, _assistant(PLACEHOLDER)], False)
        self.assistant_tail = rendered[rendered.rindex(PLACEHOLDER) + len(PLACEHOLDER) :]

    def _renders_tools(self) -> bool:
        messages = [{"role": "user", "content": "x"}]
        with_tools = self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False)
        return with_tools != self.tokenizer.apply_chat_template(messages, tokenize=False)

    def with_tools(self, messages: list[dict]) -> list[dict]:
        """The messages as the template gets them: tools in a system message where it ignores
        them (merged into the first system message, if there is one)."""
        if not self.tools or self.template_shows_tools:
            return list(messages)
        listing = TOOL_SYSTEM_PROMPT.format(
            example=json.dumps(example_call(self.tools[0])),
            tools="\n".join(json.dumps(t) for t in self.tools),
        )
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0], content=f"{messages[0]['content']}\n\n{listing}")
            return [first, *messages[1:]]
        return [{"role": "system", "content": listing}, *messages]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.with_tools(messages),
            tools=self.tools if self.template_shows_tools else None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The episode's first context: `messages` and the generation prompt."""
        return self._encode(self._render(messages, True))

    def observation_ids(self, history: list[dict], stop_text: str, observations: list[dict]) -> list[int]:
        """The ids to append after the assistant turn that ends `history` (its tokens already in
        the context, ending with `stop_text`, the decoded stop token, or "" when it ran out of
        tokens): the rest of the template's end of that turn, the `observations`, and the next
        generation prompt."""
        return self._encode(self.observation_text(history, stop_text, observations))

    def observation_text(self, history: list[dict], stop_text: str, observations: list[dict]) -> str:
        before = self._render(history, False)
        after = self._render(history + observations, True)
        if not after.startswith(before):
            raise TemplateNotAppendOnlyError(
                f"the chat template of {self.name} is not append-only: adding a "
                f"{observations[0]['role'] if observations else ''} message changes how earlier "
                "turns render, so an episode's tokens cannot be appended exactly"
            )
        tail = self.assistant_tail
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text) :]
        return tail + after[len(before) :]

    def truncate(self, text: str, max_tokens: int) -> str:
        """Tool output cut to `max_tokens` tokens (it is data, not model output, so it may be
        re-encoded), marked as cut."""
        ids = self._encode(text)
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens]) + f"\n[output truncated to {max_tokens} tokens]"


def example_call(tool: dict) -> dict:
    """A call of `tool` with each argument set to a value of its JSON type (shown to the model)."""
    function = tool.get("function", tool)
    samples = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    properties = (function.get("parameters") or {}).get("properties") or {}
    arguments = {name: samples.get(spec.get("type"), "...") for name, spec in properties.items()}
    return {"name": function.get("name", "tool"), "arguments": arguments}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def check_append_only(renderer: ChatRenderer) -> None:
    """Raise TemplateNotAppendOnlyError unless a sample episode built turn by turn (prompt, model
    text, observation delta, ...) is the same text as the whole conversation rendered at once."""
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = renderer._render(messages, True)
    turns = [
        ("Let me compute.", [{"role": "tool", "name": "calculate", "content": "5"}]),
        ("Answer: 5", [{"role": "user", "content": "Thanks. And 4 + 4?"}]),
    ]
    for reply, observations in turns:
        messages = messages + [_assistant(reply)]
        text += reply + renderer.observation_text(messages, "", observations)
        messages = messages + observations
    if text != renderer._render(messages, True):
        raise TemplateNotAppendOnlyError(
            f"the chat template of {renderer.name} is not append-only: an episode rendered turn by "
            "turn differs from the same conversation rendered at once"
        )
