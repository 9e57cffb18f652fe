"""A test environment that fails where it is told to: at reset, or at the first step."""


class Environment:
    def __init__(self, fail: str = "reset"):
        self.fail = fail

    def reset(self, item: dict):
        if self.fail == "reset":
            raise RuntimeError("the environment could not start")
        return None

    def step(self, message: dict) -> dict:
        raise RuntimeError("the tool broke")
