"""Weight-sync cost, measured in one run on the embedded SmolLM2-135M model.

    .venv/bin/python bench/bench_weight_sync.py [--engine auto|vllm|hf] [--repeats 3] [--samples 64]

Starts Ray, a real Learner (the job's LoRA r16 on q/k/v/o, DeepSpeed) and one rollout worker.
Each repeat runs one real learner step on a demo-sized batch (64 samples, 40 prompt + 48
completion tokens), then syncs over every transport, once with the LoRA adapter and once with
the full weights (the adapter merged in). A sync is timed from the export call until the worker
serves the version (export + transfer + checks + engine load). Between syncs the learner's
policy_version is advanced without a step: the tensors keep their size, which is all a sync's
cost depends on. Prints medians and the ratios: sync time as a share of a learner step, and full
vs adapter sync time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRANSPORTS = ("object_store", "broadcast", "file")
PAYLOADS = ("lora", "full")


def demo_batch(step: int, samples: int, vocab: int):
    import torch

    from learner.interface import TrainBatch, TrainSample

    generator = torch.Generator().manual_seed(step)
    rows = [
        TrainSample(
            f"s{step}-{i}",
            torch.randint(10, vocab, (40,), generator=generator).tolist(),
            torch.randint(10, vocab, (48,), generator=generator).tolist(),
            [-2.0] * 48,
            1.0 if i % 2 else -1.0,
            0,
        )
        for i in range(samples)
    ]
    return TrainBatch(step, rows, temperature=0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64, help="samples in the learner step's batch")
    args = parser.parse_args()

    import ray
    from transformers import AutoConfig

    from core.model_store import ensure_default_model
    from learner.learner import Learner
    from rollout_workers.worker import RolloutWorker
    from services.config import load_config
    from services.orchestrator.setup import actor_env
    from weight_sync.channel import WeightSyncChannel
    from weight_sync.transports import make_transport

    class BenchLearner(Learner):
        """The learner with one bench-only call: a new policy version without a step."""

        def bench_advance_version(self) -> int:
            self.policy_version += 1
            return self.policy_version

    model_path = str(ensure_default_model())
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "examples" / "arithmetic.yaml", [f"model.path={model_path}", f"rollout.engine={args.engine}"]
    )
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": actor_env(heavy_actors=2)})
    try:
        learner = ray.remote(BenchLearner).remote(model_path, **cfg.learner_kwargs())
        worker = ray.remote(RolloutWorker).remote("w0", cfg.rollout, cfg.engine_spec(model_path))
        engine = ray.get(worker.engine_name.remote())
        vocab = AutoConfig.from_pretrained(model_path).vocab_size
        transports = {
            name: make_transport(
                name, learner, cfg.sync.bucket_mb * 2**20, cfg.sync.broadcast_timeout_s, file_root=None
            )
            for name in TRANSPORTS
        }
        channels = {
            (t, p): WeightSyncChannel(transports[t], learner, payload=p) for t in TRANSPORTS for p in PAYLOADS
        }
        # Warm-up: first calls pay imports, group formation, first allocations.
        for channel in channels.values():
            channel.publish(ray.get(learner.bench_advance_version.remote()), channel.export(), [worker])
        step_seconds, sync_seconds, pause_seconds = [], {k: [] for k in channels}, {k: [] for k in channels}
        for repeat in range(args.repeats):
            started = time.perf_counter()
            stats = ray.get(learner.train_step.remote(demo_batch(repeat, args.samples, vocab)))
            step_seconds.append(time.perf_counter() - started)
            for key, channel in channels.items():
                version = ray.get(learner.bench_advance_version.remote())
                started = time.perf_counter()
                result = channel.publish(version, channel.export(), [worker])
                sync_seconds[key].append(time.perf_counter() - started)
                pause_seconds[key].append(result.pause_seconds["w0"])
            print(
                f"repeat {repeat + 1}/{args.repeats}: step {step_seconds[-1]:.2f} s ({stats.tokens} tokens)",
                flush=True,
            )
    finally:
        ray.shutdown()

    step = statistics.median(step_seconds)
    report = {
        "engine": engine,
        "repeats": args.repeats,
        "samples": args.samples,
        "learner_step_s": round(step, 3),
        "transports": {},
    }
    print(
        f"\nSmolLM2-135M, LoRA r16 q/k/v/o, engine {engine}; medians of {args.repeats}; "
        f"learner step {step:.2f} s ({args.samples} samples x 88 tokens)"
    )
    print(
        f"{'transport':<13} {'adapter s':>10} {'full s':>8} {'full/adapter':>13} {'adapter/step':>13} "
        f"{'full/step':>10} {'adapter pause s':>16}"
    )
    for t in TRANSPORTS:
        lora, full = (statistics.median(sync_seconds[(t, p)]) for p in PAYLOADS)
        pause = statistics.median(pause_seconds[(t, "lora")])
        report["transports"][t] = {
            "adapter_sync_s": round(lora, 4),
            "full_sync_s": round(full, 4),
            "full_over_adapter": round(full / lora, 2),
            "adapter_sync_share_of_step": round(lora / step, 4),
            "full_sync_share_of_step": round(full / step, 4),
            "adapter_pause_s": round(pause, 4),
        }
        print(
            f"{t:<13} {lora:>10.3f} {full:>8.3f} {full / lora:>12.1f}x {lora / step:>12.1%} "
            f"{full / step:>9.1%} {pause:>16.3f}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
