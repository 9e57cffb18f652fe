"""A test environment: answers every assistant turn with a user message until `turns` turns,
with a reward of 0.1 a turn. It keeps state between calls (the count), as real ones do."""


class Environment:
    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, item: dict):
        self.seen = 0
        self.item_id = item["id"]
        return None  # the item's own messages

    def step(self, message: dict) -> dict:
        self.seen += 1
        done = self.seen >= self.turns
        heard = f"Turn {self.seen} of {self.item_id}: I read {len(message['content'])} characters. Go on."
        return {"messages": [] if done else [{"role": "user", "content": heard}], "done": done, "reward": 0.1}
