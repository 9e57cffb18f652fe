"""A test agent program written against the OpenAI client: it talks to the model for `rounds`
turns, answering each reply with a user message, and returns a reward of 0.1 a turn."""

from openai import OpenAI


def run(item, base_url, rounds=3):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = list(item["messages"])
    for turn in range(1, rounds + 1):
        reply = client.chat.completions.create(model="rft-policy", messages=messages)
        content = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": content})
        if turn < rounds:
            heard = f"Turn {turn} of {item['id']}: I read {len(content)} characters. Go on."
            messages.append({"role": "user", "content": heard})
    return 0.1 * rounds
