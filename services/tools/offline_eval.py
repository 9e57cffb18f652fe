"""Offline scoring in the sandbox, no Ray: `rft eval` (a model (+ adapter) on a dataset, greedy)
and `rft grade` (samples already written, e.g. a run's samples.jsonl)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from core.config import ConfigError
from core.model_store import resolve_model_path
from learner.config import LearnerConfig
from reward_workers.config import RewardConfig
from reward_workers.interface import ScoredRollout
from reward_workers.pool import hack_rates, score_locally
from rollout_workers.config import RolloutConfig
from rollout_workers.interface import Rollout
from services.config import DataConfig, JobConfig, ModelConfig, load_config
from services.orchestrator.data import DatasetError, json_lines, load_items, prompt_token_ids
from services.orchestrator.evaluation import eval_requests, greedy_settings, summarize


def read_adapter(adapter_dir: Path):
    """The peft adapter in `adapter_dir` (a full-weight job's model directory is refused, naming
    the option to use)."""
    from weight_sync.adapter import AdapterWeights

    if (Path(adapter_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"--adapter {adapter_dir} is a whole model (a full-weight job's output): "
            f"pass it as --model {adapter_dir}"
        )
    return AdapterWeights.load_pretrained(adapter_dir)


def eval_rollout(engine: str, max_new_tokens: int, environment: Path | None = None) -> RolloutConfig:
    """The rollout section `rft eval` generates with. `environment`: a job config (its rollout
    section's environment and episode limits), an environment spec YAML ({type, path, ...}, the
    path relative to it), or a .py file of tool functions (type tools)."""
    episodes: dict = {}
    if environment is not None:
        if not environment.is_file():
            raise FileNotFoundError(f"--environment: {environment} not found")
        if environment.suffix == ".py":
            episodes = {"environment": {"type": "tools", "path": str(environment.resolve())}}
        else:
            raw = yaml.safe_load(environment.read_text())
            if isinstance(raw, dict) and "rollout" in raw:  # a job config
                rollout = load_config(environment).rollout
                episodes = rollout.model_dump(include=EPISODE_FIELDS, exclude_unset=False)
            elif isinstance(raw, dict):
                path = Path(str(raw.get("path", ""))).expanduser()
                resolved = path if path.is_absolute() else (environment.parent / path).resolve()
                episodes = {"environment": {**raw, "path": str(resolved)}}
            else:
                raise ConfigError(f"--environment {environment}: a job config or an environment spec mapping")
    try:
        return RolloutConfig(engine=engine, max_new_tokens=max_new_tokens, **episodes)
    except ValidationError as e:
        raise ConfigError(f"--environment {environment}: {e}") from None


EPISODE_FIELDS = {
    "environment",
    "max_turns",
    "max_episode_tokens",
    "max_tool_output_tokens",
    "environment_timeout_s",
    "environment_errors",
    "environment_cpu_s",
    "environment_memory_mb",
    "environment_allow_weak_isolation",
}


def eval_config(
    model_path: Path, adapter, data: Path, reward: RewardConfig, rollout: RolloutConfig
) -> JobConfig:
    """A job config that makes the engine serve `adapter`'s LoRA shape (or the default one)."""
    lora = LearnerConfig()
    if adapter is not None:  # the engine's LoRA slots must have the adapter's shape
        lora = LearnerConfig(
            lora_rank=adapter.peft_config["r"],
            lora_alpha=adapter.peft_config["lora_alpha"],
            lora_target_modules=sorted(adapter.peft_config["target_modules"]),
        )
    return JobConfig(
        model=ModelConfig(path=str(model_path)),
        data=DataConfig(train=str(data)),
        reward=reward,
        rollout=rollout,
        learner=lora,
    )


def evaluate_model(
    model: str | None,
    adapter_dir: Path | None,
    data: Path,
    reward: RewardConfig,
    rollout: RolloutConfig,
    limit: int | None,
    output: Path | None,
) -> dict:
    """Greedy completions (or, with `rollout.environment`, greedy episodes) of a rollout worker
    run here, without Ray, exactly as a job's workers generate them; graded in the sandbox."""
    from transformers import AutoTokenizer

    from rollout_workers.worker import RolloutWorker  # torch: only `rft eval` needs it

    model_path = resolve_model_path(model)
    items = load_items(data)[:limit]
    adapter = read_adapter(adapter_dir) if adapter_dir else None
    cfg = eval_config(model_path, adapter, data, reward, rollout)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = {item["id"]: prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens) for item in items}
    worker = RolloutWorker("eval", cfg.rollout, cfg.engine_spec(model_path))
    try:
        if adapter is not None:  # served as it is: its version is not the job's to check here
            worker.loop.exclusive(lambda: worker.engine.load_adapter(adapter))
        requests = eval_requests(items, prompts, episodes=rollout.environment is not None)
        generated = worker.generate(requests, greedy_settings(rollout.max_new_tokens))
    finally:
        worker.close()
    rollouts = [dataclasses.replace(r, policy_version=int(adapter is not None)) for r in generated]
    scored = score_locally(reward, rollouts, {item["id"]: item for item in items})
    if output:
        with output.open("w") as out:
            for s in scored:
                out.write(json.dumps(result_record(s)) + "\n")
    return {
        "model": str(model_path),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "engine": worker.engine_name(),
        **summarize(scored),
    }


def result_record(s: ScoredRollout) -> dict:
    return {"id": s.rollout.prompt_id, **s.grading_record()}


def load_samples(path: Path) -> list[Rollout]:
    """Samples to grade, one JSON object a line: {"id" or "prompt_id", "output_text"} or a run's
    samples.jsonl lines ({"sample_id": "<prompt id>#<index>", "text"}). Errors name file:line."""
    rollouts, per_prompt = [], {}
    for where, sample in json_lines(path, "samples"):
        if "sample_id" in sample and "text" in sample:  # the run's own format
            prompt_id, _, index = str(sample["sample_id"]).rpartition("#")
            text = sample["text"]
        else:
            prompt_id, index = sample.get("id", sample.get("prompt_id")), ""
            text = sample.get("output_text")
        if not isinstance(prompt_id, str) or not prompt_id or not isinstance(text, str):
            raise DatasetError(
                f"{where}: needs 'id' (or 'prompt_id') and 'output_text' strings, "
                "or a run's 'sample_id' and 'text'"
            )
        per_prompt[prompt_id] = per_prompt.get(prompt_id, -1) + 1
        sample_index = int(index) if index.isdigit() else per_prompt[prompt_id]
        finish_reason = sample.get("finish_reason", "stop")
        rollout = Rollout(prompt_id, sample_index, [], [], [], 0, finish_reason, text)
        if isinstance(sample.get("turns"), list):  # an episode (a multi-turn run's samples.jsonl)
            rollout.turns = sample["turns"]
            rollout.environment_reward = float((sample.get("components") or {}).get("environment", 0.0))
        rollouts.append(rollout)
    if not rollouts:
        raise DatasetError(f"{path}: no samples")
    return rollouts


def grade_samples(reward: RewardConfig, data: Path, samples: Path) -> tuple[list[ScoredRollout], dict]:
    """Score every sample against its item; returns the scored samples and a summary: the eval
    summary (accuracy, reward_mean, grader_error_rate, component means) plus the mean reward and
    the hack rate of the grader and of each sub-grader."""
    items = {item["id"]: item for item in load_items(data)}
    rollouts = load_samples(samples)
    missing = sorted({r.prompt_id for r in rollouts} - items.keys())
    if missing:
        raise DatasetError(f"{samples}: no item in {data} for ids {missing[:5]}")
    scored = score_locally(reward, rollouts, items)
    grader = reward.grader
    n = len(scored)
    reward_means = {grader.name: sum(s.reward for s in scored) / n}
    for name in getattr(grader, "graders", {}):  # a multi grader's sub-graders
        reward_means[name] = sum(s.components.get(name, 0.0) for s in scored) / n
    summary = {
        **summarize(scored),
        "reward_mean_by_grader": reward_means,
        "hack_rate_by_grader": hack_rates(grader, scored),
    }
    return scored, summary
