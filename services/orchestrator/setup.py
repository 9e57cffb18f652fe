"""Everything a job needs before its loop starts: validated inputs (checked before any actor
exists, so bad input fails fast and names the culprit), then Ray and the actors."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError
from core.logs import LOG_DIR_ENV
from core.model_store import resolve_model_path
from core.sandbox.redaction import url_password
from core.telemetry import TARGETS_DIRNAME, MetricsContext
from learner.group import LearnerGroup
from reward_workers.grader_spec import check_grader
from reward_workers.pool import RewardPool
from rollout_workers.chat_render import ChatRenderer, TemplateNotAppendOnlyError, check_append_only
from rollout_workers.environments.client import check_environment
from services.config import DataConfig, JobConfig
from services.orchestrator.data import DatasetError, load_items, prompt_token_ids
from services.orchestrator.demonstrations import (
    Demonstration,
    PreferencePair,
    load_demonstrations,
    load_preference_pairs,
)
from services.orchestrator.rollout_scheduler import RolloutScheduler
from services.orchestrator.teachers import TeacherInputs, prepare_teachers, start_teacher
from weight_sync.channel import WeightSyncChannel

log = logging.getLogger("rft.setup")
WORKER_THREADS = 32  # per rollout worker: its open streams (a few per step in flight), weight loads, pings


@dataclass
class JobInputs:
    model_path: Path
    train_items: list[dict]
    heldout_items: list[dict]
    items_by_id: dict[str, dict]
    prompt_ids: dict[str, list[int]]  # item id -> prompt token ids
    extra_heldout: dict[str, list[dict]] = field(default_factory=dict)  # eval.extra_heldout, loaded
    # Stage index -> its data: an sft stage's demonstrations, an offline dpo stage's pairs.
    demonstrations: dict[int, list[Demonstration]] = field(default_factory=dict)
    preference_pairs: dict[int, list[PreferencePair]] = field(default_factory=dict)
    teachers: dict[int, TeacherInputs] = field(default_factory=dict)  # distill stage index -> its teacher's


def prepare_inputs(cfg: JobConfig) -> JobInputs:
    """Resolve the model, read and check both datasets and the grader file, tokenize prompts."""
    from transformers import AutoTokenizer

    model_path = resolve_model_path(cfg.model.path)
    check_grader(cfg.reward.grader)  # python grader files exist; the type can run
    tools = None
    if cfg.rollout.environment is not None:  # its file exists and loads in the sandbox
        tools = check_environment(cfg.rollout.environment, cfg.rollout)
    train_items = load_items(cfg.data.train, cfg.data.fields)
    heldout_items = load_heldout(cfg.data.heldout, cfg.data)
    extra_heldout = {name: load_heldout(path, cfg.data) for name, path in cfg.eval.extra_heldout.items()}
    check_distinct_ids(
        {"data.train": train_items, "data.heldout": heldout_items}
        | {f"eval.extra_heldout.{name}": items for name, items in extra_heldout.items()}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cfg.rollout.environment is not None:  # episodes append observations to the model's tokens
        try:
            check_append_only(
                ChatRenderer(tokenizer, tools, name=str(cfg.model.path or "the embedded model"))
            )
        except TemplateNotAppendOnlyError as e:
            raise ConfigError(f"rollout.environment: {e}") from None
    every_item = train_items + heldout_items + [item for items in extra_heldout.values() for item in items]
    items_by_id = {item["id"]: item for item in every_item}
    prompt_ids = {
        i: prompt_token_ids(item, tokenizer, cfg.data.max_prompt_tokens) for i, item in items_by_id.items()
    }
    stages = list(enumerate(cfg.stages or []))
    limit = cfg.data.max_prompt_tokens  # the stages' data, tokenized: a bad row fails here, before any actor
    demonstrations = {i: load_demonstrations(s.data, tokenizer, limit) for i, s in stages if s.kind == "sft"}
    preference_pairs = {
        i: load_preference_pairs(s.data, tokenizer, limit) for i, s in stages if s.kind == "dpo" and s.data
    }
    teachers = prepare_teachers(cfg, model_path, tokenizer, train_items)  # their prompts, checked here too
    return JobInputs(
        model_path,
        train_items,
        heldout_items,
        items_by_id,
        prompt_ids,
        extra_heldout,
        demonstrations,
        preference_pairs,
        teachers,
    )


def load_heldout(path: str | None, data: DataConfig) -> list[dict]:
    items = load_items(path, data.fields) if path else []
    return items[: data.heldout_limit] if data.heldout_limit else items


def check_distinct_ids(datasets: dict[str, list[dict]]) -> None:
    """Item ids name rollouts, samples and grades: one id in two sets (a held-out item also in
    training, or a paraphrase reusing its original's id) would mix them up."""
    seen: dict[str, str] = {}
    for name, items in datasets.items():
        shared = sorted({item["id"] for item in items if item["id"] in seen})
        if shared:
            raise DatasetError(f"ids in both {seen[shared[0]]} and {name}: {shared[:5]}")
        seen.update({item["id"]: name for item in items})


def actor_env(heavy_actors: int = 2) -> dict[str, str]:
    """Environment every actor process gets: offline hub, and the cores shared out among the
    processes that compute at the same time (the learner ranks and the rollout workers):
    oversubscribed OpenMP threads spin against each other, which measured ~10x slower here than
    one thread each. (DeepSpeed's accelerator is chosen by each learner rank on its own node.)"""
    threads = max(1, (os.cpu_count() or 1) // max(1, heavy_actors))
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
    }
    for name in ("VLLM_CPU_KVCACHE_SPACE", "RFT_CACHE_DIR", "TORCH_EXTENSIONS_DIR", LOG_DIR_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def init_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = actor_env(heavy_actors=cfg.learner.num_ranks + cfg.rollout.num_workers)
    # The actors' output goes to files (core/logs.py): keep Ray's INFO lines off the terminal too.
    ray_logging = logging.WARNING if LOG_DIR_ENV in env else logging.INFO
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env}, logging_level=ray_logging)
    else:
        ray.init(
            num_cpus=cfg.cluster.num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=True,
            logging_level=ray_logging,
        )


@dataclass
class Actors:
    learner: LearnerGroup
    rollouts: RolloutScheduler  # the rollout workers, behind the scheduler that keeps them alive
    reward_pool: RewardPool
    channel: WeightSyncChannel
    metrics: MetricsContext
    teachers: dict[int, object] = field(default_factory=dict)  # distill stage index -> its teacher's actor

    def shutdown(self) -> None:
        import ray

        for teacher in self.teachers.values():
            ray.kill(teacher)
        self.reward_pool.shutdown()
        self.rollouts.shutdown()
        self.learner.shutdown()
        self.metrics.forget_all()


def metrics_context(cfg: JobConfig) -> MetricsContext:
    """Where the job's actors announce their metrics endpoints (next to the driver's)."""
    return MetricsContext(
        job=cfg.name, targets_dir=str(Path(cfg.run_root).resolve() / TARGETS_DIRNAME), host=cfg.metrics.host
    )


def rollout_worker_factory(cfg: JobConfig, model_path: Path, metrics: MetricsContext | None = None):
    """A function that starts one more rollout-worker actor: (worker_id, handle)."""
    import itertools

    import ray

    from rollout_workers.worker import RolloutWorker

    worker_numbers = itertools.count()

    def start_worker() -> tuple[str, object]:
        worker_id = f"rollout-{next(worker_numbers)}"
        handle = (
            ray.remote(RolloutWorker)
            .options(
                name=f"{cfg.name}-{worker_id}",
                num_cpus=cfg.rollout.num_cpus_per_worker,
                num_gpus=cfg.rollout.num_gpus_per_worker,
                resources=cfg.rollout.resources,
                # Threads: streams, weight loads and pings reach the worker while its engine loop runs.
                max_concurrency=WORKER_THREADS,
            )
            .remote(worker_id, cfg.rollout, cfg.engine_spec(model_path), metrics)
        )
        return worker_id, handle

    return start_worker


def start_actors(cfg: JobConfig, inputs: JobInputs) -> Actors:
    import ray

    init_ray(cfg)
    metrics = metrics_context(cfg)
    learner = LearnerGroup(
        str(inputs.model_path), cfg.learner, cfg.learner_kwargs(), name=f"{cfg.name}-learner", metrics=metrics
    )
    channel = WeightSyncChannel.from_config(
        cfg.sync, learner.sender, default_file_dir=str(cfg.run_dir / "weights")
    )
    rollouts = RolloutScheduler(
        rollout_worker_factory(cfg, inputs.model_path, metrics),
        channel,
        cfg.rollout.num_workers,
        on_worker_gone=metrics.forget,
    )
    reward_pool = RewardPool(cfg.reward, metrics=metrics, secrets=tuple(url_password(cfg.cluster.redis_url)))
    teachers = {index: start_teacher(cfg, index, teacher) for index, teacher in inputs.teachers.items()}
    actors = Actors(learner, rollouts, reward_pool, channel, metrics, teachers)
    engines = ray.get([w.engine_name.remote() for w in rollouts.workers.values()])
    log.info(
        "actors up: %d learner rank(s), %d rollout workers (%s), %d reward workers, %d teacher(s)",
        cfg.learner.num_ranks,
        len(engines),
        ", ".join(engines),
        cfg.reward.num_workers,
        len(teachers),
    )
    return actors
