"""`rft eval`: a model (+ adapter) on a dataset, greedy, graded in the sandbox — no Ray needed."""
from __future__ import annotations

import json
from pathlib import Path

from reward_workers.pool import score_locally
from rollout_workers.engines import make_engine
from rollout_workers.interface import Rollout
from services.config import DataConfig, JobConfig, LearnerConfig, ModelConfig, RewardConfig, RolloutConfig
from services.data import load_items, prompt_token_ids
from services.evaluation import greedy_settings, summarize
from services.model_store import resolve_model_path
from weight_sync.adapter import AdapterWeights


def evaluate_model(model: str | None, adapter_dir: Path | None, data: Path, reward: RewardConfig,
                   engine: str, max_new_tokens: int, limit: int | None, output: Path | None) -> dict:
    from transformers import AutoTokenizer

    model_path = resolve_model_path(model)
    items = load_items(data)[:limit]
    adapter = AdapterWeights.load_pretrained(adapter_dir) if adapter_dir else None
    lora = LearnerConfig()
    if adapter is not None:  # the engine's LoRA slots must have the adapter's shape
        lora = LearnerConfig(lora_rank=adapter.peft_config["r"], lora_alpha=adapter.peft_config["lora_alpha"],
                             lora_target_modules=sorted(adapter.peft_config["target_modules"]))
    cfg = JobConfig(model=ModelConfig(path=str(model_path)), data=DataConfig(train=str(data)), reward=reward,
                    rollout=RolloutConfig(engine=engine, max_new_tokens=max_new_tokens), learner=lora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens) for item in items]

    inference = make_engine(engine, model_path, cfg)
    if adapter is not None:
        inference.load_adapter(adapter)
    completions = inference.generate(prompts, greedy_settings(max_new_tokens))
    rollouts = [Rollout(item["id"], 0, p, c.completion_ids, c.behaviour_logprobs, int(adapter is not None),
                        c.finish_reason, c.text) for item, p, c in zip(items, prompts, completions)]
    scored = score_locally(reward, rollouts, {item["id"]: item for item in items})
    if output:
        with output.open("w") as out:
            for s in scored:
                out.write(json.dumps({"id": s.rollout.prompt_id, "text": s.rollout.text, "reward": s.reward,
                                      "components": s.components, "grader_error": s.grader_error}) + "\n")
    return {"model": str(model_path), "adapter": str(adapter_dir) if adapter_dir else None,
            "engine": inference.name, **summarize(scored)}
