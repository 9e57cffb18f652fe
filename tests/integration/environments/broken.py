"""A test environment that fails where it is told to: at reset, at the first step, or by
starting with a context longer than any engine holds ("long")."""


class Environment:
    def __init__(self, fail: str = "reset"):
        self.fail = fail

    def reset(self, item: dict):
        if self.fail == "reset":
            raise RuntimeError("the environment could not start")
        if self.fail == "long":
            return [{"role": "user", "content": "many words " * 4000}]
        return None

    def step(self, message: dict) -> dict:
        raise RuntimeError("the tool broke")
