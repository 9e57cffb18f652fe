"""llm_judge (= OpenAI's score_model): a model scores the sample with a rubric.

Where the model is called: in the reward worker's own process (the process holding the
GraderSandbox: a reward-worker actor, or `rft eval`/`rft grade`), never in the sandbox. The
sandbox has no network (an endpoint is unreachable from it) and per-sample CPU/memory limits far
below what a model needs, and the call is trusted code: the worker renders the judge's messages
from the spec's templates and sends the untrusted completion to the model as data only (it is
never executed or interpreted here). `Judges.attach` runs every llm_judge of the grader tree
on each sample before the sandbox sees it and puts the outcome in the sample under
`llm_judge.<key>` (key = a hash of the judge's spec); inside the sandbox `build` only turns that
outcome into a reward, so an llm_judge composes with the other graders in a `multi`.

Judges: `base_url` (an OpenAI-compatible endpoint, POST {base_url}/chat/completions; the key,
if any, from the environment variable `api_key_env`), or without base_url a local Hugging Face
model directory in `model` ("default" = the embedded SmolLM2), generating greedily at
temperature 0. The score is parsed from the reply (parse_score) and normalised from `range` to
[0, 1]; an unparseable or out-of-range reply scores 0 with the reason; a failed call is a grader
error (the sample's fault it is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request

from reward_workers.graders.templates import GraderInputError, render_text

SAMPLE_FIELD = "llm_judge"
DEFAULT_MAX_TOKENS = 32
RUBRIC_SYSTEM = (
    "You are a strict grader. Score the response below with this rubric.\n\nRubric:\n{rubric}\n\n"
    "Reply with only `Score: N`, where N is a number from {low:g} to {high:g}."
)
RUBRIC_USER = "Task:\n{item_text}\n\nResponse:\n{{{{sample.output_text}}}}"
_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_LABELLED = re.compile(r"\"?score\"?\s*[:=]\s*\"?" + _NUMBER, re.IGNORECASE)
_FRACTION = re.compile(_NUMBER + r"\s*(?:/|out of)\s*" + _NUMBER, re.IGNORECASE)
MAX_REPLY_CHARS = 2000


def judge_key(spec: dict) -> str:
    """Names a judge's outcome in the sample; the same on both sides of the sandbox (the spec as JSON)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def judge_messages(spec: dict, sample: dict, item: dict) -> list[dict]:
    """The judge's chat: the spec's `input` messages, or the rubric + item + sample template."""
    if spec.get("input"):
        return [
            {"role": m["role"], "content": render_text(m["content"], sample, item)} for m in spec["input"]
        ]
    low, high = spec["range"]
    system = RUBRIC_SYSTEM.format(rubric=spec["rubric"], low=low, high=high)
    user = RUBRIC_USER.format(item_text=spec["item_text"])
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": render_text(user, sample, item)},
    ]


def parse_score(reply: str, low: float, high: float) -> tuple[float | None, str | None]:
    """(raw score, None), or (None, why not). Accepted, in this order: `score: N` / `"score": N`
    (the last one), `N/high` or `N out of high` (the last one), or a reply that is only a number."""
    text = reply.strip()
    labelled = _LABELLED.findall(text)
    fractions = [n for n, d in _FRACTION.findall(text) if float(d) == high]
    if labelled:
        value = float(labelled[-1])
    elif fractions:
        value = float(fractions[-1])
    elif re.fullmatch(_NUMBER + r"\.?", text):
        value = float(text.rstrip("."))
    else:
        return None, "no score found (expected `Score: N`, `N/high` or just a number)"
    if not low <= value <= high:
        return None, f"score {value:g} is outside the range [{low:g}, {high:g}]"
    return value, None


class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint."""

    def __init__(self, spec: dict):
        self.url = spec["base_url"].rstrip("/") + "/chat/completions"
        self.model, self.timeout_s = spec["model"], spec["timeout_s"]
        key = os.environ.get(spec["api_key_env"])
        self.headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        }
        params = dict(spec.get("sampling_params") or {})
        max_tokens = params.pop("max_completions_tokens", params.pop("max_tokens", DEFAULT_MAX_TOKENS))
        self.params = {"temperature": 0.0, **params, "max_tokens": max_tokens}

    def reply(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url} answered HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(f"{self.url}: {e}") from None
        try:
            return str(answer["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(
                f"{self.url} sent no choices[0].message.content: {str(answer)[:300]}"
            ) from None


class LocalJudge:
    """A local Hugging Face causal LM, loaded once; greedy at temperature 0, else seeded sampling."""

    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.model_store import ModelNotFoundError, resolve_model_path

        try:
            path = resolve_model_path(None if spec["model"] in ("default", "embedded") else spec["model"])
        except ModelNotFoundError as e:
            raise ModelNotFoundError(
                f"llm_judge {spec['name']!r}: model {spec['model']!r} is neither a local model "
                f"directory nor 'default' ({e}); for a served model give base_url"
            ) from None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        params = spec.get("sampling_params") or {}
        self.max_new_tokens = int(
            params.get("max_completions_tokens", params.get("max_tokens", DEFAULT_MAX_TOKENS))
        )
        self.temperature = float(params.get("temperature", 0.0))
        self.top_p, self.seed = float(params.get("top_p", 1.0)), int(params.get("seed", 0))
        self._torch = torch

    def reply(self, messages: list[dict]) -> str:
        torch = self._torch
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        sampling = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            if self.temperature > 0
            else {"do_sample": False}
        )
        torch.manual_seed(self.seed)
        with torch.no_grad():
            out = self.model.generate(
                **ids,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


class Judges:
    """Every llm_judge of one grader tree, called in this (the reward worker's) process."""

    def __init__(self, specs: list[dict]):
        self._judges = {}
        models = {}  # one load per local model directory
        for spec in specs:
            if spec.get("base_url"):
                judge = EndpointJudge(spec)
            else:
                judge = models.get(spec["model"]) or LocalJudge(spec)
                models[spec["model"]] = judge
            self._judges[judge_key(spec)] = (spec, judge)

    @classmethod
    def for_grader(cls, grader) -> Judges | None:
        """None when the grader (a validated GraderConfig) has no llm_judge."""
        from reward_workers.grader_spec import LlmJudgeGrader, walk

        specs = [node.model_dump(mode="json") for _, node in walk(grader) if isinstance(node, LlmJudgeGrader)]
        return cls(specs) if specs else None

    def attach(self, samples: list[dict], items: list[dict]) -> list[dict]:
        """The samples with each judge's outcome under sample["llm_judge"][key]."""
        judged = []
        for sample, item in zip(samples, items):
            outcomes = {}
            for key, (spec, judge) in self._judges.items():
                try:
                    reply = judge.reply(judge_messages(spec, sample, item))
                except (GraderInputError, RuntimeError) as e:
                    outcomes[key] = {"error": str(e)}
                    continue
                score, why = parse_score(reply, *spec["range"])
                outcomes[key] = {"reply": reply[:MAX_REPLY_CHARS], "score": score, "why": why}
            judged.append({**sample, SAMPLE_FIELD: outcomes})
        return judged


def build(spec: dict):
    """In the sandbox: the reward from the outcome the reward worker attached to the sample."""
    key, (low, high) = judge_key(spec), spec["range"]

    def grade(sample: dict, item: dict) -> dict:
        outcome = (sample.get(SAMPLE_FIELD) or {}).get(key)
        if outcome is None:
            raise GraderInputError(
                f"llm_judge {spec['name']!r}: no judge outcome in the sample (judges run in the "
                "reward worker's process before the sandbox: grade through GraderSandbox)"
            )
        if "error" in outcome:
            raise RuntimeError(f"llm_judge {spec['name']!r}: the judge call failed: {outcome['error']}")
        if outcome["score"] is None:
            return {
                "reward": 0.0,
                "components": {"parsed": 0.0},
                "diagnostics": [f"judge reply unusable: {outcome['why']}; reply {outcome['reply']!r:.300}"],
            }
        components = {"score": outcome["score"], "parsed": 1.0}
        if spec.get("pass_threshold") is not None:
            components["passed"] = float(outcome["score"] >= spec["pass_threshold"])
        return {"reward": (outcome["score"] - low) / (high - low), "components": components}

    return grade
