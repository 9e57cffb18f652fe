"""Everything a job needs before its loop starts: validated inputs (checked before any actor
exists, so bad input fails fast and names the culprit), then Ray and the actors."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from services.config import JobConfig
from services.data import DatasetError, load_items, prompt_token_ids
from services.model_store import resolve_model_path

log = logging.getLogger("rft.setup")


@dataclass
class JobInputs:
    model_path: Path
    train_items: list[dict]
    heldout_items: list[dict]
    items_by_id: dict[str, dict]
    prompt_ids: dict[str, list[int]]  # item id -> prompt token ids


def prepare_inputs(cfg: JobConfig) -> JobInputs:
    """Resolve the model, read and check both datasets and the grader file, tokenize prompts."""
    from transformers import AutoTokenizer

    model_path = resolve_model_path(cfg.model.path)
    grader_source = Path(cfg.reward.grader.source)
    if not grader_source.is_file():
        raise FileNotFoundError(f"reward.grader.source: {grader_source} not found")
    train_items = load_items(cfg.data.train)
    heldout_items = load_items(cfg.data.heldout) if cfg.data.heldout else []
    if cfg.data.heldout_limit:
        heldout_items = heldout_items[:cfg.data.heldout_limit]
    overlap = {i["id"] for i in train_items} & {i["id"] for i in heldout_items}
    if overlap:
        raise DatasetError(f"ids in both data.train and data.heldout: {sorted(overlap)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items_by_id = {item["id"]: item for item in train_items + heldout_items}
    prompt_ids = {i: prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens) for i, item in items_by_id.items()}
    return JobInputs(model_path, train_items, heldout_items, items_by_id, prompt_ids)


def actor_env(heavy_actors: int = 2) -> dict[str, str]:
    """Environment every actor process gets: offline hub, CPU DeepSpeed when there is no GPU, and
    the cores shared out among the processes that compute at the same time (the learner and the
    rollout workers): oversubscribed OpenMP threads spin against each other, which measured
    ~10x slower here than one thread each."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // max(1, heavy_actors))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for name in ("VLLM_CPU_KVCACHE_SPACE", "RFT_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def init_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = actor_env(heavy_actors=1 + cfg.rollout.num_workers)
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)


@dataclass
class Actors:
    cfg: JobConfig
    model_path: Path
    learner: object
    rollout_workers: list
    reward_pool: object
    channel: object
    _next_worker_index: int = field(default=0)

    def new_rollout_worker(self):
        import ray

        from rollout_workers.worker import RolloutWorker

        worker_id = f"rollout-{self._next_worker_index}"
        self._next_worker_index += 1
        return ray.remote(RolloutWorker).options(
            name=f"{self.cfg.name}-{worker_id}", num_cpus=self.cfg.rollout.num_cpus_per_worker,
            num_gpus=self.cfg.rollout.num_gpus_per_worker, max_concurrency=1,
        ).remote(worker_id, self.cfg, str(self.model_path))

    def live_rollout_worker(self, index: int):
        """The worker at `index`, replaced by a fresh one synced to the current version if dead."""
        import ray

        try:
            ray.get(self.rollout_workers[index].ping.remote())
        except ray.exceptions.RayActorError:
            self.rollout_workers[index] = self.new_rollout_worker()
            ack = self.channel.catch_up(self.rollout_workers[index])
            if ack is not None:
                ray.get(ack)
        return self.rollout_workers[index]

    def shutdown(self) -> None:
        import ray

        self.reward_pool.shutdown()
        for actor in [self.learner, *self.rollout_workers]:
            ray.kill(actor)


def start_actors(cfg: JobConfig, inputs: JobInputs) -> Actors:
    import ray

    from learner.learner import Learner
    from reward_workers.pool import RewardPool
    from weight_sync.channel import WeightSyncChannel

    init_ray(cfg)
    learner = ray.remote(Learner).options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus).remote(
        cfg, str(inputs.model_path))
    actors = Actors(cfg, inputs.model_path, learner, [], RewardPool(cfg.reward), WeightSyncChannel())
    actors.rollout_workers = [actors.new_rollout_worker() for _ in range(cfg.rollout.num_workers)]
    engines = ray.get([w.engine_name.remote() for w in actors.rollout_workers])
    log.info("actors up: learner, %d rollout workers (%s), %d reward workers",
             len(engines), ", ".join(engines), cfg.reward.num_workers)
    return actors
