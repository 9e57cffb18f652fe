"""`rft export`: a run's trained policy as a directory of its own.

A LoRA run exports its peft adapter with the base model's tokenizer and a note naming the base
model and the job, or with `merge` one Hugging Face model directory with the adapter folded in
(peft's `merge_and_unload`), which transformers and vLLM load like any model. A full-weight run's
`model/` is already that and is copied as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.model_store import resolve_model_path
from learner.checkpoint import copy_model_side_files, staged
from services.config import load_config
from services.orchestrator.checkpoints import checkpoints

EXPORT_INFO = "rft_export.json"


class ExportError(ValueError):
    """A run directory or output directory that cannot be exported from or to; says why."""


@dataclass
class RunPolicy:
    """The trained policy a run directory holds, and what it needs to be loaded."""

    job: str
    kind: str  # "adapter" (a LoRA run) or "model" (a full-weight run's model directory)
    source: Path
    model_setting: str | None  # the run's model.path; None = the embedded model
    dtype: str
    checkpoint: str | None = None

    def base_model(self) -> Path:
        """The base model directory, resolved as the job resolved it (the embedded default too)."""
        return resolve_model_path(self.model_setting)


def find_run_policy(run_dir: Path, checkpoint: str | None = None) -> RunPolicy:
    """The finished run's adapter/ or model/, or a LoRA checkpoint's adapter (`step_N`)."""
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml): give runs/<job>")
    cfg = load_config(run_dir / "config.yaml")
    kind = "adapter" if cfg.learner.lora else "model"
    policy = RunPolicy(cfg.name, kind, run_dir / kind, cfg.model.path, cfg.model.dtype, checkpoint)
    saved = [f"step_{step}" for step, _ in checkpoints(run_dir)]
    if checkpoint is not None:
        if checkpoint not in saved:
            raise ExportError(f"{run_dir} has no checkpoint {checkpoint!r} (it has: {saved or 'none'})")
        if kind == "model":  # DeepSpeed state only, no model directory
            raise ExportError(
                f"{checkpoint} of a full-weight run holds DeepSpeed state, not a model directory: "
                f"export the finished run's {run_dir / 'model'}"
            )
        policy.source = run_dir / "checkpoints" / checkpoint / "learner" / "adapter"
    elif not policy.source.is_dir():
        hint = f"; or export a checkpoint: --checkpoint {saved[-1]}" if saved and kind == "adapter" else ""
        raise ExportError(
            f"{run_dir} has no {kind}/: the job has not finished (its {kind} is written at the end); "
            f"continue it with rft run --resume {run_dir}{hint}"
        )
    return policy


def check_output(output: Path, protected: list[Path], force: bool) -> None:
    """Refuse a non-empty output directory unless `force`, and never replace the run itself."""
    target = output.resolve()
    for path in protected:
        path = path.resolve()
        if target == path or target in path.parents or path in target.parents:
            raise ExportError(f"-o {output}: overlaps {path}, which the export reads")
    if output.exists() and not output.is_dir():
        raise ExportError(f"-o {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"-o {output}: exists and is not empty (--force replaces it)")


def export_run(
    run_dir: Path, output: Path, merge: bool = False, checkpoint: str | None = None, force: bool = False
) -> dict:
    """Write the run's policy to `output` (atomically: a staging directory renamed into place);
    returns what EXPORT_INFO records."""
    policy = find_run_policy(run_dir, checkpoint)
    check_output(output, [run_dir, policy.source], force)
    dtype = policy.dtype
    with staged(output) as staging:
        if policy.kind == "model":
            shutil.copytree(policy.source, staging, dirs_exist_ok=True)
            exported = "model"
        elif merge:
            dtype = write_merged_model(policy.source, policy.base_model(), policy.dtype, staging)
            exported = "merged model"
        else:
            shutil.copytree(policy.source, staging, dirs_exist_ok=True)
            copy_model_side_files(policy.base_model(), staging)
            exported = "adapter"
        info = {
            "job": policy.job,
            "exported": exported,
            "base_model": str(policy.base_model()) if policy.kind == "adapter" else None,
            "source": str(policy.source.resolve()),
            "checkpoint": policy.checkpoint,
            "dtype": dtype,
        }
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (staging / "README.md").write_text(export_readme(info, output.resolve()))
    return info


def write_merged_model(adapter_dir: Path, base_model: Path, dtype: str, directory: Path) -> str:
    """Base + adapter merged in fp32 (W + alpha/r B A), rounded once to the job's dtype (auto: the
    base checkpoint's own, since the machine that loads it may not be this one), saved as
    safetensors with the base's tokenizer, chat template and generation config. Returns the dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    saved_as = AutoConfig.from_pretrained(base_model).dtype if dtype == "auto" else dtype
    saved_as = str(saved_as or "float32").removeprefix("torch.")
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(getattr(torch, saved_as)).save_pretrained(directory, safe_serialization=True)
    copy_model_side_files(base_model, directory)
    return saved_as


def export_readme(info: dict, output: Path) -> str:
    lines = [f"# {info['job']}: {info['exported']} exported by `rft export`", ""]
    lines += [f"- from: `{info['source']}`", f"- dtype: {info['dtype']}"]
    if info["exported"] == "adapter":
        lines += [
            f"- base model: `{info['base_model']}`",
            "",
            "A peft LoRA adapter (with the base model's tokenizer). Load it with",
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{info['base_model']}'), "
            f"'{output}')`, or serve it with vLLM: `--model {info['base_model']} --enable-lora "
            f"--lora-modules {info['job']}={output}`.",
        ]
    else:
        lines += [
            "",
            "A Hugging Face model directory: `AutoModelForCausalLM.from_pretrained('{0}')`, "
            "`vllm.LLM(model='{0}')`, `rft serve {0}`.".format(output),
        ]
    return "\n".join(lines) + "\n"
