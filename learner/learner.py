"""The learner: a Hugging Face causal LM trained by a DeepSpeed engine, either as a LoRA adapter
on the frozen base (`learner.lora`, the default) or all its weights (`learner.lora: false`).

One instance is one rank. `train_shard` = this rank's part of one optimizer step (its share of
the batch, accumulated over micro-batches; `learner/shards.py` splits a batch); the driver runs
N ranks through `learner/group.py`. Alone (no `WorldSpec`) it is rank 0 of 1, and `train_step`
trains a whole TrainBatch. The same code runs on CPU (gloo, DS_ACCELERATOR=cpu) and CUDA (nccl).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from core.dtypes import resolve_dtype
from core.logs import log_to_file
from core.telemetry import ComponentMetrics, MetricsContext
from learner.checkpoint import load_engine_checkpoint, save_model_directory, staged, write_engine_checkpoint
from learner.config import AlgorithmConfig, LearnerConfig
from learner.distributed import WorldSpec, deepspeed_config, init_distributed
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.logprobs import check_packed_attention, completion_logprobs, stack_padded
from learner.objectives import OBJECTIVES
from learner.samples import policy_mask, policy_tokens
from learner.shards import DUMMY_SAMPLE, MiniBatchShard, ShardResult, TrainShard
from learner.steps import train_batch
from learner.threads import ThreadGovernor
from weight_sync.adapter import AdapterWeights
from weight_sync.endpoints import WeightsSender
from weight_sync.full_weights import FullWeights, base_parameters

log = logging.getLogger(__name__)


class Learner(WeightsSender):
    """Sends each policy version through `WeightsSender` (`open_sync_store`, `join_sync_group`,
    `broadcast_weights`, `write_weights_version`)."""

    def __init__(
        self,
        model_path: str,
        *,
        learner: LearnerConfig,
        algorithm: AlgorithmConfig,
        dtype: str = "auto",
        seed: int = 0,
        metrics: MetricsContext | None = None,
        world: WorldSpec | None = None,
    ):
        log_to_file(f"learner-{world.rank if world else 0}")  # before anything prints
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        setting, dtype_name = dtype, resolve_dtype(dtype)
        dtype = getattr(torch, dtype_name)
        if learner.zero_stage == 0 and dtype == torch.float32:
            # DeepSpeed's plain fp32 optimizer applies non-finite gradients; every ZeRO stage and
            # its bf16 optimizer skip such a step, which train_step relies on.
            raise ValueError(
                f"learner.zero_stage=0 with model.dtype={dtype_name} (set: {setting}) cannot skip "
                "non-finite steps; use zero_stage >= 1 or bfloat16 on a device that has it"
            )
        self.deepspeed = init_distributed(world)
        self.rank, self.world_size = (world.rank, world.world_size) if world else (0, 1)
        self.settings, self.algorithm = learner, algorithm
        self.policy_version = 0
        self.threads = ThreadGovernor(learner.threads)
        self.metrics = metrics and ComponentMetrics(
            metrics,
            "learner",
            "learner" if self.world_size == 1 else f"learner-{self.rank}",
            counters={
                "steps": "optimizer steps taken",
                "skipped_steps": "steps skipped for non-finite numbers",
                "train_seconds": "wall time in train_step",
                "trained_tokens": "completion tokens trained on",
            },
            gauges={"policy_version": "policy version after the last step"},
        )
        self.model_path = model_path
        self.lora = learner.lora
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        log.info("model dtype %s (model.dtype: %s)", dtype_name, setting)
        if learner.pack_sequences:
            check_packed_attention(self.model)
        # π_ref, when the loss has a KL term: a LoRA learner switches its adapter off; a full-weight
        # learner keeps a frozen copy of the base model (one more copy of the weights in memory).
        self.reference: torch.nn.Module | None = None
        if self.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the adapter's random init is the job's, not the process's
                self.model = get_peft_model(self.model, LoraConfig(**learner.lora_shape.peft_kwargs()))
        elif algorithm.kl_coef > 0:
            self.reference = (
                AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).requires_grad_(False).eval()
            )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, *_ = self.deepspeed.initialize(
            model=self.model, model_parameters=self.trainable, config=deepspeed_config(learner, dtype)
        )
        if self.reference is not None:
            self.reference.to(self.engine.device)

    # ---- log-probs -------------------------------------------------------------------------

    def _micro_batches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        size = self.settings.micro_batch_size
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def _logprobs(self, samples: list[TrainSample], temperature: float, packed: bool = False, model=None):
        return completion_logprobs(
            model or self.engine,
            [(s.prompt_ids, s.completion_ids) for s in samples],
            temperature,
            chunk_tokens=self.settings.logprob_chunk_tokens,
            packed=packed,
        )

    @torch.no_grad()
    def _reference_logprobs(
        self, samples: list[TrainSample], temperature: float, packed: bool
    ) -> torch.Tensor:
        """Log-probs under π_ref, the base model."""
        if self.reference is not None:
            return self._logprobs(samples, temperature, packed, model=self.reference)[0]
        if not self.lora:
            raise ValueError(
                "a full-weight learner keeps the base model only with algorithm.kl_coef > 0; "
                "give dpo samples reference_logprob (Learner.score_sequences)"
            )
        with self.model.disable_adapter():  # the same weights with the adapter switched off
            return self._logprobs(samples, temperature, packed)[0]

    @torch.no_grad()
    def score(self, samples: list[TrainSample], temperature: float) -> list[list[float]]:
        """Per-token log-probs of each completion under the current policy."""
        self.engine.eval()
        scores = []
        for chunk in self._micro_batches(samples):
            logprobs, _, _ = self._logprobs(chunk, temperature)
            scores += [row[: len(s.completion_ids)].tolist() for row, s in zip(logprobs.float().cpu(), chunk)]
        return scores

    def score_sequences(self, samples: list[TrainSample]) -> list[float]:
        """Σ log π over each sample's loss-mask tokens at temperature 1, with the current weights:
        a dpo sample's `reference_logprob` (taken when its stage starts; learner/objectives/dpo.py)."""
        return [
            sum(logprob for logprob, m in zip(row, policy_mask(s)) if m)
            for row, s in zip(self.score(samples, 1.0), samples)
        ]

    # ---- training --------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> StepStats:
        """One learner step on the whole batch, alone (a group splits it: `learner/group.py`);
        skipped, weights unchanged, on non-finite numbers."""
        if self.world_size != 1:
            raise RuntimeError("train_step trains alone; a learner group trains through train_shard")
        return train_batch(
            batch,
            1,
            self.settings,
            self.algorithm,
            self.policy_version,
            lambda shards: [self.train_shard(shard) for shard in shards],
        )

    def train_shard(self, shard: TrainShard) -> ShardResult:
        """This rank's part of a learner step: `shard.epochs` passes over its mini-batches, one
        optimizer step each (DeepSpeed all-reduces the gradients across the ranks; it skips a
        step whose gradient norm is not finite, on every rank alike, and zeroes the gradients).
        With more than one update, π_old is a snapshot taken first (one no-grad forward)."""
        started = time.perf_counter()
        for group in self.engine.optimizer.param_groups:  # a stage's own, or the configured one
            group["lr"] = shard.learning_rate or self.settings.learning_rate
        snapshot = shard.updates > 1
        result = ShardResult(
            policy_version=self.policy_version,
            applied=[],
            grad_norms=[],
            seconds=0.0,
            old_logprobs=self._snapshot(shard) if snapshot else {},
            entropy={},
            new_logprobs=[],
            ref_logprobs={} if shard.reference else None,
        )
        for epoch in range(shard.epochs):
            for mini in shard.mini_batches:
                self._update(mini, shard, result, first_pass=epoch == 0)
        trained = any(result.applied)
        if trained:
            self.policy_version += 1  # one version per learner step, however many updates it took
        result.policy_version, result.seconds = self.policy_version, time.perf_counter() - started
        result.mean_threads = self.threads.mean_threads()
        if self.metrics:
            tokens = sum(
                policy_tokens(s) for mini in shard.mini_batches for m in mini.micro_batches for s in m
            )
            self.metrics.add("steps" if trained else "skipped_steps")
            self.metrics.add("train_seconds", result.seconds)
            self.metrics.add("trained_tokens", tokens if trained else 0)
            self.metrics.set("policy_version", self.policy_version)
        return result

    def _update(self, mini: MiniBatchShard, shard: TrainShard, result: ShardResult, first_pass: bool) -> None:
        """Forward and backward the mini-batch's micro-batches, then one optimizer step. Records
        π_θ per sample; on the first pass also the entropy, π_ref and (without a snapshot) π_old."""
        self.engine.train()
        snapshot = shard.updates > 1
        new: dict[int, torch.Tensor] = {}
        positions = iter(mini.sample_indices)
        for k, samples in enumerate(mini.micro_batches):
            self.engine.set_gradient_accumulation_boundary(k == len(mini.micro_batches) - 1)
            rows = [next(positions) for _ in samples]
            old = [result.old_logprobs[i] for i in rows] if snapshot else None
            ref = [result.ref_logprobs[i] for i in rows] if result.ref_logprobs and not first_pass else None
            computed = self._micro_step(samples, shard, mini.denominator, old, ref, first_pass)
            for row, (logprobs, entropy, ref_row) in zip(rows, computed):
                new[row] = logprobs
                if first_pass:
                    result.old_logprobs.setdefault(row, logprobs)
                    result.entropy[row] = entropy
                    if ref_row is not None:
                        result.ref_logprobs[row] = ref_row
        self.engine.step()
        result.applied.append(self.engine.was_step_applied())
        result.grad_norms.append(float(self.engine.get_global_grad_norm()))
        result.new_logprobs.append(new)

    def _micro_step(self, samples, shard: TrainShard, denominator, old_rows, ref_rows, first_pass):
        """Forward and backward one micro-batch, adding its share of the mini-batch loss (the
        shard's objective: learner/objectives/) to the gradient; an empty one runs the dummy with
        zero weight (the ranks' collectives stay in step, so it makes the same forward passes a
        real one makes). π_old is `old_rows` (a snapshot) or, with one update per step, π_θ
        detached from the same forward (ρ = 1); π_ref, where the loss takes it, is computed on the
        first pass, then `ref_rows`. Returns per sample (π_θ, entropy, π_ref | None), detached, on CPU."""
        self.threads.adjust()
        real = bool(samples)
        samples = samples or [DUMMY_SAMPLE]
        device = self.engine.device
        new_logprobs, mask, entropy = self._logprobs(samples, shard.temperature, shard.packed)
        width = mask.shape[1]
        old = stack_padded(old_rows, width).to(device) if old_rows else new_logprobs.detach()
        ref = None
        if shard.reference:
            if first_pass:
                ref = self._reference_logprobs(samples, shard.temperature, shard.packed)
            else:  # cached (a dummy's is never used: its weight is 0)
                ref = stack_padded(ref_rows, width).to(device) if ref_rows else new_logprobs.detach()
        if not real:  # a zero gradient of the same graph, whatever the objective
            self.engine.backward(new_logprobs.sum() * 0.0)
            return []
        objective = OBJECTIVES[shard.objective]
        loss, _ = objective.loss(samples, new_logprobs, old, ref, self.algorithm, denominator)
        self.engine.backward(loss)
        detached = new_logprobs.detach().float().cpu()
        return [
            (
                detached[i, : len(s.completion_ids)],
                entropy[i, : len(s.completion_ids)].float().cpu(),
                ref[i, : len(s.completion_ids)].float().cpu() if ref is not None else None,
            )
            for i, s in enumerate(samples)
        ]

    @torch.no_grad()
    def _snapshot(self, shard: TrainShard) -> dict[int, torch.Tensor]:
        """π_old of every sample of the shard, before its first update: one no-grad forward per
        micro-batch (the dummy included: under ZeRO-3 a forward gathers weights, a collective)."""
        self.engine.eval()
        old = {}
        for mini in shard.mini_batches:
            positions = iter(mini.sample_indices)
            for samples in mini.micro_batches:
                self.threads.adjust()
                logprobs, _, _ = self._logprobs(samples or [DUMMY_SAMPLE], shard.temperature, shard.packed)
                for i, sample in enumerate(samples):
                    old[next(positions)] = logprobs[i, : len(sample.completion_ids)].float().cpu()
        return old

    # ---- exported weights, output and checkpoints -------------------------------------------
    # Under ZeRO-3 exporting gathers each parameter from its partitions, a collective: every rank
    # calls these, and ranks other than 0 answer None.

    def process_id(self) -> int:
        return os.getpid()

    def export_adapter(self) -> AdapterWeights | None:
        """The current adapter, as a copy (the live tensors keep training)."""
        from peft import get_peft_model_state_dict

        if not self.lora:
            raise ValueError(
                "learner.lora is false: this learner trains full weights and has no adapter; "
                "export_full_weights (sync.payload: full) gives its policy"
            )
        # A no-op except under ZeRO-3.
        with self.deepspeed.zero.GatheredParameters(self.trainable):
            if self.rank != 0:
                return None
            tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return AdapterWeights.create(
            version=self.policy_version, tensors=tensors, peft_config=self.peft_config()
        )

    def export_full_weights(self) -> FullWeights | None:
        """The current policy as full weights under checkpoint names, in the model's dtype, for a
        full-weight sync: the trained weights, or for a LoRA the base with the adapter merged in."""
        adapter = self.export_adapter() if self.lora else None
        with self.deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            if self.rank != 0:
                return None
            weights = {name: p.detach() for name, p in base_parameters(self.model).items()}
            return FullWeights.create(
                self.policy_version, adapter.merged_into(weights) if adapter else weights
            )

    def export_policy(self, payload: str) -> tuple[int, AdapterWeights | FullWeights | None]:
        """(policy_version, the weights in the sync payload `payload`: lora or full). Called with
        Ray's num_returns=2, so a caller can check the small version for errors and pass the
        weights' ref on without fetching them."""
        weights = self.export_full_weights() if payload == "full" else self.export_adapter()
        return self.policy_version, weights

    def peft_config(self) -> dict[str, Any]:
        """The LoraConfig as JSON-able data (sets as sorted lists), incl. base_model_name_or_path."""
        return json.loads(json.dumps(self.model.peft_config["default"].to_dict(), default=sorted))

    def save_adapter(self, directory: str | Path) -> Path | None:
        adapter = self.export_adapter()
        return adapter.save_pretrained(directory) if adapter is not None else None

    def save_policy(self, directory: str | Path) -> Path | None:
        """The job's output: the adapter (peft format), or with learner.lora false the whole model
        as a Hugging Face model directory (tokenizer files copied from the base model's)."""
        if self.lora:
            return self.save_adapter(directory)
        weights = self.export_full_weights()
        if weights is None:
            return None
        return save_model_directory(self.model, weights.tensors, self.model_path, directory)

    def write_checkpoint(self, directory: str | Path) -> None:
        """Optimizer state, policy_version and the trained weights (a LoRA's adapter, or every
        weight) into `directory`, which every rank of the group writes its part of."""
        # A LoRA checkpoint leaves the frozen base out and keeps a peft copy of the adapter too.
        extra = (lambda into: self.save_adapter(into / "adapter")) if self.lora else None
        write_engine_checkpoint(
            self.engine,
            directory,
            self.policy_version,
            self.world_size,
            exclude_frozen=self.lora,
            extra=extra,
        )

    def save_checkpoint(self, directory: str | Path) -> Path:
        """`write_checkpoint` alone: into a directory next to `directory`, then renamed."""
        with staged(directory) as staging:
            self.write_checkpoint(staging)
        return Path(directory)

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore a checkpoint (every rank of the group that wrote it); returns its policy version."""
        self.policy_version = load_engine_checkpoint(
            self.engine, directory, self.world_size, strict=not self.lora
        )
        return self.policy_version
