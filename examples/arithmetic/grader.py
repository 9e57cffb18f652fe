"""Arithmetic grader with partial credit. Runs inside the reward sandbox.

reward = 0.2 for ending with a well-formed 'Answer: <number>' line + 0.8 if that number is right.
Components: format, correct (the strict score the held-out accuracy counts) and
lenient_correct (the last number anywhere in the reply is right, whatever the format).
"""
import re

_ANSWER = re.compile(r"answer\s*[:=]\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def _to_float(text):
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def grade(sample, item):
    reply = sample["output_text"]
    truth = float(item["reward_model"]["ground_truth"])
    answers = _ANSWER.findall(reply)
    formatted = bool(answers)
    answer = _to_float(answers[-1]) if answers else None
    correct = formatted and answer is not None and abs(answer - truth) < 1e-6
    numbers = _NUMBER.findall(reply)
    last_number = _to_float(numbers[-1]) if numbers else None
    lenient = last_number is not None and abs(last_number - truth) < 1e-6
    return {
        "reward": 0.2 * formatted + 0.8 * correct,
        "components": {"format": float(formatted), "correct": float(correct), "lenient_correct": float(lenient)},
    }
