"""TRL's GRPOTrainer on the demo's work, for bench/bench_vs_trl.py (run in the TRL venv it makes).

The same model directory, training items, reward function (examples/arithmetic/grader.py, called
in-process here: TRL has no sandbox), sampling (8 prompts x 8 samples a step, temperature 0.7,
full vocabulary, <= 48 new tokens), LoRA (r 16, alpha 32, q/k/v/o, no dropout), optimizer (AdamW,
the demo's lr, constant, no weight decay, grad clip 1), no KL term, token-level loss with group
std-scaled advantages -- and the same wall-clock budget rule as rft's `max_minutes`: stop once
the next step would end past it. Writes the adapter to --output and a JSON line of what it did
to stdout (prefix `trl-result: `).

    .venv-trl/bin/python bench/trl_grpo_run.py --model DIR --train train.jsonl --grader grader.py \\
        --minutes 10 --output runs/bench-vs-trl/trl-adapter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

START = time.monotonic()  # the budget counts from the process's start, model loading included


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--grader", required=True)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, required=True, help="rft's learner.learning_rate")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], required=True, help="rft's, resolved")
    return parser.parse_args()


def reward_function(grader_path: str):
    spec = importlib.util.spec_from_file_location("grader", grader_path)
    grader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grader)

    def arithmetic_reward(completions, ground_truth, **_) -> list[float]:
        return [
            grader.grade(
                {"output_text": completion[-1]["content"]}, {"reward_model": {"ground_truth": truth}}
            )["reward"]
            for completion, truth in zip(completions, ground_truth)
        ]

    return arithmetic_reward


def budget_callback(seconds: float):
    """rft's max_minutes rule as a TrainerCallback: stop once elapsed + the last step's time
    would pass the budget."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            self.step_seconds.append(now - self.began)
            if now - START + self.step_seconds[-1] > seconds:
                control.should_training_stop = True

    return Budget()


def grpo_config(output_dir: str, seed: int, learning_rate: float, dtype: str):
    """The demo's sampling, optimizer and loss in GRPOConfig's terms."""
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=8,  # 8 x 8 = 64 completions = 8 prompts x 8 samples a step
        num_generations=8,
        max_completion_length=48,
        temperature=0.7,
        top_p=1.0,
        top_k=0,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",  # token-level mean over the batch, as rft's token_mean
        scale_rewards="group",
        num_iterations=1,
        max_steps=10_000,  # the budget ends it
        bf16=dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs={"dtype": dtype},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
    )


def main() -> None:
    args = parse_args()
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    items = [json.loads(line) for line in open(args.train)]
    dataset = Dataset.from_list(
        [{"prompt": item["messages"], "ground_truth": item["reward_model"]["ground_truth"]} for item in items]
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    budget = budget_callback(args.minutes * 60)
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=reward_function(args.grader),
        args=grpo_config(args.output + ".trainer", args.seed, args.learning_rate, args.dtype),
        train_dataset=dataset,
        peft_config=lora,
        callbacks=[budget],
    )
    trainer.train()
    trainer.save_model(args.output)
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    result = {
        "steps": trainer.state.global_step,
        "seconds": time.monotonic() - START,
        "step_seconds": budget.step_seconds,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
    }
    print("trl-result: " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
