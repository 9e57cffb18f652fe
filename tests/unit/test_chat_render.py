"""Token-exact multi-turn contexts: the model's ids are kept as sampled, observations appended as
the chat template's delta, templates that are not append-only refused. The embedded model's
tokenizer (SmolLM2, a ChatML template without tool support)."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from core.model_store import ensure_default_model
from rollout_workers.chat_render import ChatRenderer, TemplateNotAppendOnlyError, check_append_only

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_default_model())


def test_an_episode_built_turn_by_turn_is_the_conversation_and_keeps_the_sampled_ids(tokenizer):
    renderer = ChatRenderer(tokenizer, TOOLS)
    messages = [{"role": "user", "content": "What is 12 * 7?"}]
    context = renderer.prompt_ids(messages)
    # The model sampled "hello" as single characters: decoding and re-encoding would merge them.
    sampled = [tokenizer.convert_tokens_to_ids(c) for c in "hello"] + [tokenizer.eos_token_id]
    assert tokenizer(tokenizer.decode(sampled[:-1]), add_special_tokens=False)["input_ids"] != sampled[:-1]
    context += sampled
    messages.append({"role": "assistant", "content": tokenizer.decode(sampled, skip_special_tokens=True)})
    observation = [{"role": "tool", "name": "calculate", "content": "84"}]
    delta = renderer.observation_ids(messages, tokenizer.decode(sampled[-1:]), observation)
    context += delta
    assert context[-len(delta) - len(sampled) : -len(delta)] == sampled  # copied, not re-encoded
    whole = tokenizer.apply_chat_template(
        renderer.with_tools(messages + observation), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(context) == whole
    assert tokenizer.decode(delta) == "\n<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\n"


def test_a_turn_cut_by_the_token_limit_gets_the_end_of_turn_from_the_template(tokenizer):
    renderer = ChatRenderer(tokenizer)
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "cut off mid"}]
    delta = renderer.observation_ids(history, "", [{"role": "user", "content": "go on"}])
    assert tokenizer.decode(delta).startswith("<|im_end|>\n<|im_start|>user\ngo on")


def test_tools_go_in_a_system_message_when_the_template_ignores_them(tokenizer):
    renderer = ChatRenderer(tokenizer, TOOLS)
    assert not renderer.template_shows_tools
    text = tokenizer.decode(renderer.prompt_ids([{"role": "user", "content": "hi"}]))
    assert '"name": "calculate"' in text and "<tool_call>" in text
    # The example call is valid JSON for the first tool: small models copy what they are shown.
    assert '<tool_call>{"name": "calculate", "arguments": {"expression": "..."}}</tool_call>' in text
    assert "named SmolLM" not in text  # the system message with the tools replaces the default one
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert renderer.with_tools(own_system)[0]["content"].startswith("Be brief.\n\n")


def test_a_template_that_renders_tools_itself_gets_them(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tokenizer, TOOLS)
    assert renderer.template_shows_tools
    text = tokenizer.decode(renderer.prompt_ids([{"role": "user", "content": "hi"}]))
    assert text.startswith("<tools>") and "<tool_call>" not in text
    check_append_only(renderer)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_model(tokenizer):
    check_append_only(ChatRenderer(tokenizer, TOOLS, name="SmolLM2"))  # ChatML appends
    tokenizer = copy.deepcopy(tokenizer)
    # Like templates that drop the reasoning of every assistant turn but the last.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}[earlier answer]{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateNotAppendOnlyError, match="template of my-model is not append-only"):
        check_append_only(ChatRenderer(tokenizer, name="my-model"))


def test_tool_output_is_cut_to_its_token_budget(tokenizer):
    renderer = ChatRenderer(tokenizer)
    long = " ".join(str(n) for n in range(500))
    cut = renderer.truncate(long, 20)
    assert cut.endswith("[output truncated to 20 tokens]")
    assert len(tokenizer(cut.split("\n[output")[0], add_special_tokens=False)["input_ids"]) <= 21
    assert renderer.truncate("short", 20) == "short"
