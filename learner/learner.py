"""The learner: a Hugging Face causal LM trained by a DeepSpeed engine, either as a LoRA adapter
on the frozen base (`learner.lora`, the default) or all its weights (`learner.lora: false`).

One `train_step` = one optimizer step on one TrainBatch, accumulated over micro-batches.
The same code runs on CPU (gloo, DS_ACCELERATOR=cpu) and CUDA (nccl). The driver wraps the
class with `ray.remote`; in a plain process it starts a one-rank process group itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.net import free_port
from core.telemetry import ComponentMetrics, MetricsContext
from learner.checkpoint import load_engine_checkpoint, save_engine_checkpoint, save_model_directory
from learner.config import AlgorithmConfig, LearnerConfig
from learner.interface import StepStats, TrainBatch, TrainSample
from learner.logprobs import completion_logprobs, right_pad
from learner.losses import policy_loss
from weight_sync.adapter import AdapterWeights
from weight_sync.endpoints import WeightsSender
from weight_sync.full_weights import FullWeights, base_parameters

log = logging.getLogger(__name__)


def _init_distributed() -> Any:
    """Import deepspeed for this machine and join (or start) its process group.

    A launcher (torchrun, the deepspeed CLI) sets RANK/WORLD_SIZE/MASTER_*; alone, this process
    is rank 0 of 1 on a free loopback port.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is imported
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not torch.distributed.is_initialized():
        # Alone: a fresh port every time. A MASTER_PORT inherited from a parent process (Ray
        # workers inherit the driver's environment) may be held by that parent's own group.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


class Learner(WeightsSender):
    """Sends each policy version through `WeightsSender` (`open_sync_store`, `join_sync_group`,
    `broadcast_weights`, `write_weights_version`)."""

    def __init__(
        self,
        model_path: str,
        *,
        learner: LearnerConfig,
        algorithm: AlgorithmConfig,
        dtype: str = "bfloat16",
        seed: int = 0,
        metrics: MetricsContext | None = None,
    ):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, dtype)
        if learner.zero_stage == 0 and dtype == torch.float32:
            # DeepSpeed's plain fp32 optimizer applies non-finite gradients; every ZeRO stage and
            # its bf16 optimizer skip such a step, which train_step relies on.
            raise ValueError(
                "learner.zero_stage=0 with model.dtype=float32 cannot skip non-finite steps; "
                "use zero_stage >= 1 or bfloat16"
            )
        self.deepspeed = _init_distributed()
        self.settings, self.algorithm = learner, algorithm
        self.policy_version = 0
        self.metrics = metrics and ComponentMetrics(
            metrics,
            "learner",
            "learner",
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
        # gradient_accumulation_steps stays 1: batches vary in size, so train_step marks the
        # last micro-batch as the accumulation boundary itself, and steps once per batch.
        ds_config = {
            "train_micro_batch_size_per_gpu": learner.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner.grad_clip,
            "zero_optimization": {"stage": learner.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            # torch_adam: no fused-Adam JIT build (~65 s on CPU); for a few MB of LoRA weights it
            # would not pay, and full weights train with the same optimizer.
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": learner.learning_rate,
                    "weight_decay": learner.weight_decay,
                    "torch_adam": True,
                },
            },
        }
        self.engine, *_ = self.deepspeed.initialize(
            model=self.model, model_parameters=self.trainable, config=ds_config
        )
        if self.reference is not None:
            self.reference.to(self.engine.device)

    # ---- log-probs -------------------------------------------------------------------------

    def _micro_batches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        size = self.settings.micro_batch_size
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def _logprobs(self, samples: list[TrainSample], temperature: float):
        return completion_logprobs(
            self.engine, [(s.prompt_ids, s.completion_ids) for s in samples], temperature
        )

    @torch.no_grad()
    def _reference_logprobs(self, samples: list[TrainSample], temperature: float) -> torch.Tensor:
        """Log-probs under π_ref, the base model."""
        if self.reference is not None:
            return completion_logprobs(
                self.reference, [(s.prompt_ids, s.completion_ids) for s in samples], temperature
            )[0]
        with self.model.disable_adapter():  # the same weights with the adapter switched off
            return self._logprobs(samples, temperature)[0]

    @torch.no_grad()
    def score(self, samples: list[TrainSample], temperature: float) -> list[list[float]]:
        """Per-token log-probs of each completion under the current policy."""
        self.engine.eval()
        scores = []
        for chunk in self._micro_batches(samples):
            logprobs, _, _ = self._logprobs(chunk, temperature)
            scores += [row[: len(s.completion_ids)].tolist() for row, s in zip(logprobs.float().cpu(), chunk)]
        return scores

    # ---- training --------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> StepStats:
        """One optimizer step on the batch (skipped, adapter unchanged, on non-finite numbers)."""
        stats = self._train_step(batch)
        if self.metrics:
            self.metrics.add("skipped_steps" if stats.skipped else "steps")
            self.metrics.add("train_seconds", stats.step_seconds)
            self.metrics.add("trained_tokens", 0 if stats.skipped else stats.tokens)
            self.metrics.set("policy_version", stats.policy_version)
        return stats

    def _train_step(self, batch: TrainBatch) -> StepStats:
        started = time.perf_counter()
        samples = batch.samples
        if not samples:
            raise ValueError(f"step {batch.step}: empty batch")
        for s in samples:
            if len(s.behaviour_logprobs) != len(s.completion_ids):
                raise ValueError(
                    f"sample {s.sample_id}: {len(s.behaviour_logprobs)} behaviour logprobs "
                    f"for {len(s.completion_ids)} completion tokens"
                )
        tokens = sum(len(s.completion_ids) for s in samples)
        behaviour = right_pad([s.behaviour_logprobs for s in samples], 0.0, torch.float32)
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        if not (behaviour.isfinite().all() and advantages.isfinite().all()):
            # Checked here, not left to the loss: sequence_mask mode would silently drop the sample.
            log.warning("step %d: non-finite behaviour logprobs or advantages; step skipped", batch.step)
            return self._skipped_stats(batch.step, tokens, started)

        # Token-mean over the whole batch: every micro-batch divides by the batch's count.
        denominator = tokens if self.algorithm.loss_aggregation == "token_mean" else len(samples)
        old, mask, entropy, ref = self._backward(batch, behaviour, advantages, denominator)
        self.engine.step()
        # DeepSpeed's optimizers skip a step whose gradient norm is not finite and zero the grads.
        skipped = not self.engine.was_step_applied()
        if not skipped:
            self.policy_version += 1

        # Reported numbers come from one call over the whole batch (detached, elementwise work),
        # so they need no re-weighting across micro-batches; its loss equals their sum.
        loss, metrics = policy_loss(old, old, behaviour, ref, advantages, mask, self.algorithm)
        return StepStats(
            step=batch.step,
            policy_version=self.policy_version,
            loss=loss.item(),
            grad_norm=float(self.engine.get_global_grad_norm()),
            entropy=entropy[mask].mean().item(),
            tokens=tokens,
            step_seconds=time.perf_counter() - started,
            skipped=skipped,
            **metrics,
        )

    def _backward(
        self, batch: TrainBatch, behaviour: torch.Tensor, advantages: torch.Tensor, denominator: int
    ):
        """Forward and backward every micro-batch, accumulating the gradient of the batch loss.

        Returns the whole batch's (old_logprobs, mask, entropy, ref_logprobs | None) on CPU,
        detached and padded to the batch's longest completion, for the step's metrics.
        """
        algo = self.algorithm
        device = self.engine.device
        self.engine.train()
        chunks = self._micro_batches(batch.samples)
        collected: dict[str, list[torch.Tensor]] = {"old": [], "mask": [], "entropy": [], "ref": []}
        offset = 0
        for k, chunk in enumerate(chunks):
            rows = slice(offset, offset + len(chunk))
            offset += len(chunk)
            self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            new_logprobs, mask, entropy = self._logprobs(chunk, batch.temperature)
            # One optimizer step per batch, so the weights at the start of the step are the ones
            # being trained: π_old is π_θ detached, from the same forward pass (ρ = 1 here).
            old_logprobs = new_logprobs.detach()
            ref = self._reference_logprobs(chunk, batch.temperature) if algo.kl_coef > 0 else None
            loss, _ = policy_loss(
                new_logprobs,
                old_logprobs,
                behaviour[rows, : mask.shape[1]].to(device),
                ref,
                advantages[rows].to(device),
                mask,
                algo,
                denominator=denominator,
            )
            self.engine.backward(loss)
            for name, value in (("old", old_logprobs), ("mask", mask), ("entropy", entropy), ("ref", ref)):
                if value is not None:
                    collected[name].append(F.pad(value, (0, behaviour.shape[1] - value.shape[1])).cpu())
        return tuple(
            torch.cat(collected[name]) if collected[name] else None
            for name in ("old", "mask", "entropy", "ref")
        )

    def _skipped_stats(self, step: int, tokens: int, started: float) -> StepStats:
        nan = math.nan
        return StepStats(
            step=step,
            policy_version=self.policy_version,
            loss=nan,
            grad_norm=nan,
            is_weight_mean=nan,
            is_weight_max=nan,
            is_truncated_fraction=nan,
            mismatch_kl=nan,
            clip_fraction=nan,
            entropy=nan,
            kl_ref=nan,
            tokens=tokens,
            step_seconds=time.perf_counter() - started,
            skipped=True,
            extra={"non_finite_inputs": 1.0},
        )

    # ---- exported weights, output and checkpoints -------------------------------------------

    def process_id(self) -> int:
        return os.getpid()

    def export_adapter(self) -> AdapterWeights:
        """The current adapter, as a copy (the live tensors keep training)."""
        from peft import get_peft_model_state_dict

        if not self.lora:
            raise ValueError(
                "learner.lora is false: this learner trains full weights and has no adapter; "
                "export_full_weights (sync.payload: full) gives its policy"
            )
        # A no-op except under ZeRO-3, where each parameter is gathered from its partitions.
        with self.deepspeed.zero.GatheredParameters(self.trainable):
            tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return AdapterWeights.create(
            version=self.policy_version, tensors=tensors, peft_config=self.peft_config()
        )

    def export_full_weights(self) -> FullWeights:
        """The current policy as full weights under checkpoint names, in the model's dtype, for a
        full-weight sync: the trained weights, or for a LoRA the base with the adapter merged in."""
        adapter = self.export_adapter() if self.lora else None
        with self.deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            weights = {name: p.detach() for name, p in base_parameters(self.model).items()}
            return FullWeights.create(
                self.policy_version, adapter.merged_into(weights) if adapter else weights
            )

    def peft_config(self) -> dict[str, Any]:
        """The LoraConfig as JSON-able data (sets as sorted lists), incl. base_model_name_or_path."""
        return json.loads(json.dumps(self.model.peft_config["default"].to_dict(), default=sorted))

    def save_adapter(self, directory: str | Path) -> Path:
        return self.export_adapter().save_pretrained(directory)

    def save_policy(self, directory: str | Path) -> Path:
        """The job's output: the adapter (peft format), or with learner.lora false the whole model
        as a Hugging Face model directory (tokenizer files copied from the base model's)."""
        if self.lora:
            return self.save_adapter(directory)
        return save_model_directory(
            self.model, self.export_full_weights().tensors, self.model_path, directory
        )

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Optimizer state, policy_version and the trained weights (a LoRA's adapter, or every
        weight), written next to `directory`, then renamed."""
        # A LoRA checkpoint leaves the frozen base out and keeps a peft copy of the adapter too.
        extra = (lambda staging: self.save_adapter(staging / "adapter")) if self.lora else None
        return save_engine_checkpoint(
            self.engine, directory, self.policy_version, exclude_frozen=self.lora, extra=extra
        )

    def load_checkpoint(self, directory: str | Path) -> None:
        self.policy_version = load_engine_checkpoint(self.engine, directory, strict=not self.lora)
