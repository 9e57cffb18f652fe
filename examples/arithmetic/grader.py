"""Arithmetic grader with partial credit. Runs inside the reward sandbox.

reward = 0.2 for a well-formed 'Answer: <number>' line
       + 0.3 if the last number in the reply is right, whatever the format (a denser signal: the
             base model rarely uses the format, so format-only credit leaves most groups flat)
       + 0.5 if the 'Answer:' number is right.
Full reward (1.0) = right answer in the required format: what held-out accuracy counts.
Components: format, lenient_correct, correct.

FORMAT_NEEDS_RIGHT_NUMBER = True pays the format's 0.2 only with the right number (a reward that
cannot be earned by the format alone); bench/bench_stages.py compares both.
"""

import re

_ANSWER = re.compile(r"answer\s*[:=]\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
FORMAT_NEEDS_RIGHT_NUMBER = False


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
    format_credit = formatted and (lenient or correct or not FORMAT_NEEDS_RIGHT_NUMBER)
    return {
        "reward": 0.2 * format_credit + 0.3 * lenient + 0.5 * correct,
        "components": {
            "format": float(formatted),
            "correct": float(correct),
            "lenient_correct": float(lenient),
        },
    }
