"""The learner near this box's limit, measured in one run on the embedded SmolLM2-135M model.

    .venv/bin/python bench/bench_learner.py [--repeats 3] [--samples 64] [--budget 2048]

One demo-shaped batch (the demo's prompts, tokenized as the job does; completion lengths drawn as
the demo's fall: 40 % at the 48-token cap, the rest 1-47), three measurements:

1. Peak memory of the log-prob head alone (hidden states -> log-probs + entropy of the sampled
   tokens, forward and backward) for one old micro-batch's worth of tokens: glibc's heap in use,
   read after every torch op, above the inputs; the full logits + fp32 log_softmax vs
   `learner/token_logprobs.py` (chunked).
2. Learner steps (LoRA r16 bf16, DeepSpeed ZeRO-2, one process, every core), the old settings
   (16 rows per micro-batch in batch order, full logits), the new (micro-batches by a padded
   token budget, rows sorted by length, chunked log-probs) and packed (the new with
   `learner.pack_sequences`: one row of samples end to end per micro-batch, up to the budget),
   alternating, median of the repeats after a warm-up step each.
3. The same tokens through a plain peft model's forward + backward without padding (all the
   batch's tokens in one stream cut into rows of 256, 8 rows a pass, the loss on the completion
   tokens): what this box can do at best with these tokens.

Prints `peak memory ratio chunked/naive: X`, `learner tokens/s ratio new/old: X`,
`learner tokens/s ratio packed/sorted: X` (packed over new) and `learner tokens/s vs raw fwd+bwd: X`
(new settings over raw).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def demo_batch(samples: int, model_path: str):
    from transformers import AutoTokenizer

    from learner.interface import TrainBatch, TrainSample
    from services.orchestrator.data import load_items, prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = load_items(ROOT / "examples" / "arithmetic" / "train.jsonl")[:samples]
    rng = random.Random(0)
    rows = []
    for i, item in enumerate(items):
        prompt = prompt_token_ids(item, tokenizer, 512)
        length = 48 if rng.random() < 0.4 else rng.randint(1, 47)
        completion = [rng.randrange(10, len(tokenizer)) for _ in range(length)]
        rows.append(TrainSample(f"s{i}", prompt, completion, [-2.0] * length, 1.0 if i % 2 else -1.0, 0))
    return TrainBatch(0, rows, temperature=0.7)


# ---- 1. the log-prob head's peak memory ---------------------------------------------------------


def heap_bytes() -> int:
    """Bytes glibc's malloc has handed out now (arenas + mmapped blocks): torch's CPU tensors."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
            + ("uordblks", "fordblks", "keepcost")
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def head_peak_bytes(variant: str, tokens: int, hidden_size: int, vocab: int, chunk: int) -> int:
    """Peak heap above the inputs over the head's forward and backward, read after every torch op."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from learner.token_logprobs import sampled_token_logprobs

    class PeakHeap(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, heap_bytes())
            return out

    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, dtype=torch.bfloat16).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16) * hidden_size**-0.5
    targets = torch.randint(0, vocab, (tokens,))
    probe = PeakHeap()
    probe.peak = base = heap_bytes()
    with probe:
        if variant == "naive":  # what learner/logprobs.py does with the model's logits
            logprobs_all = torch.log_softmax((hidden @ weight.T).float() / 0.7, dim=-1)
            logprobs = logprobs_all.gather(-1, targets[:, None]).squeeze(-1)
            with torch.no_grad():
                -(logprobs_all.exp() * logprobs_all).sum(-1)
        else:
            logprobs, _ = sampled_token_logprobs(hidden, weight, targets, 0.7, chunk_tokens=chunk)
        logprobs.sum().backward()
    return probe.peak - base


# ---- 2. learner steps, old vs new settings -------------------------------------------------------


def learner(model_path: str, settings: dict):
    from learner.learner import Learner
    from services.config import JobConfig

    cfg = JobConfig(
        data={"train": "unused.jsonl"}, reward={"grader": {"source": "unused.py"}}, learner=settings
    )
    return Learner(model_path, **cfg.learner_kwargs())


def timed_step(trainer, batch) -> float:
    started = time.perf_counter()
    trainer.train_step(batch)
    return time.perf_counter() - started


# ---- 3. the raw limit: the same tokens, batched without padding ---------------------------------


def raw_seconds(model_path: str, batch, row_tokens: int, rows_per_pass: int) -> float:
    """Every sample's tokens end to end in one stream, cut into rows of `row_tokens` (no padding;
    a row's attention spans the samples in it), `rows_per_pass` rows per forward + backward of a
    plain peft model; the loss is the cross-entropy of the completion tokens, whose logits alone
    go through the LM head (as the learner's chunked path does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from services.config import JobConfig

    shape = JobConfig(data={"train": "x"}, reward={"grader": {"source": "x"}}).learner.lora_shape
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16),
        LoraConfig(**shape.peft_kwargs()),
    )
    stream = [t for s in batch.samples for t in s.prompt_ids + s.completion_ids]
    is_completion = [k >= len(s.prompt_ids) for s in batch.samples for k in range(sample_length(s))]
    usable = len(stream) // row_tokens * row_tokens
    ids = torch.tensor(stream[:usable]).view(-1, row_tokens)
    scored = torch.tensor(is_completion[:usable]).view(-1, row_tokens)[:, 1:]  # predicted from the left
    lm = model.get_base_model()
    started = time.perf_counter()
    for rows in range(0, ids.shape[0], rows_per_pass):
        chunk, keep = ids[rows : rows + rows_per_pass], scored[rows : rows + rows_per_pass]
        hidden = lm.get_decoder()(input_ids=chunk, use_cache=False).last_hidden_state[:, :-1]
        logits = lm.get_output_embeddings()(hidden[keep]).float()
        torch.nn.functional.cross_entropy(logits, chunk[:, 1:][keep]).backward()
    return time.perf_counter() - started


def sample_length(sample) -> int:
    return len(sample.prompt_ids) + len(sample.completion_ids)


def medians(name: str, seconds: list[float], tokens: int) -> float:
    """Print one line for a measurement; returns its tokens/s (at the median)."""
    median = statistics.median(seconds)
    print(
        f"{name}: {median:.2f} s median of {[round(t, 2) for t in seconds]}, {tokens / median:.0f} tokens/s"
    )
    return tokens / median


def head_memory(batch, config, chunk: int) -> float:
    """Measurement 1 on the tokens of one old micro-batch's logits (16 rows, from the shortest
    prompt's last position on); returns chunked/naive."""
    from learner.config import LearnerConfig
    from learner.shards import micro_batches

    old_split = LearnerConfig(micro_batch_size=16, max_tokens_per_micro_batch=None)
    first = micro_batches(batch.samples, old_split)[0]
    tokens = len(first) * (max(sample_length(s) for s in first) - min(len(s.prompt_ids) for s in first) + 1)
    peaks = {
        v: head_peak_bytes(v, tokens, config.hidden_size, config.vocab_size, chunk)
        for v in ("naive", "chunked")
    }
    print(
        f"log-prob head, {tokens} tokens x {config.vocab_size} vocab, peak above the inputs: "
        f"naive {peaks['naive'] / 2**20:.0f} MiB, "
        f"chunked ({chunk} a chunk) {peaks['chunked'] / 2**20:.0f} MiB"
    )
    return peaks["chunked"] / peaks["naive"]


def learner_rates(model_path: str, batch, args, tokens: int) -> dict[str, float]:
    """Measurement 2: tokens/s of the old, the new and the packed settings, alternating."""
    from learner.config import AlgorithmConfig
    from learner.shards import padding_fraction, plan_shards

    settings = {
        "old": {"micro_batch_size": 16, "max_tokens_per_micro_batch": None, "logprob_chunk_tokens": None},
        "new": {
            "max_tokens_per_micro_batch": args.budget,
            "logprob_chunk_tokens": args.chunk,
        },
        "packed": {
            "max_tokens_per_micro_batch": args.budget,
            "logprob_chunk_tokens": args.chunk,
            "pack_sequences": True,
        },
    }
    trainers = {name: learner(model_path, config) for name, config in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for trainer in trainers.values():
        timed_step(trainer, batch)  # warm-up
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            times[name].append(timed_step(trainer, batch))
    rates = {}
    for name, trainer in trainers.items():
        shards = plan_shards(batch, 1, trainer.settings, AlgorithmConfig())
        rates[name] = medians(f"{name} (padding {padding_fraction(shards):.1%})", times[name], tokens)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--budget", type=int, default=2048, help="new: learner.max_tokens_per_micro_batch")
    parser.add_argument("--chunk", type=int, default=128, help="new: learner.logprob_chunk_tokens")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from core.model_store import ensure_default_model

    model_path = str(ensure_default_model())
    batch = demo_batch(args.samples, model_path)
    tokens = sum(len(s.completion_ids) for s in batch.samples)
    print(
        f"batch: {len(batch.samples)} samples, {tokens} completion tokens; cores {os.cpu_count()}, ", end=""
    )
    print(f"torch threads {torch.get_num_threads()}")

    memory_ratio = head_memory(batch, AutoConfig.from_pretrained(model_path), args.chunk)
    rates = learner_rates(model_path, batch, args, tokens)
    raw_rate = medians(
        "raw fwd+bwd", [raw_seconds(model_path, batch, 256, 8) for _ in range(args.repeats)], tokens
    )

    print(f"peak memory ratio chunked/naive: {memory_ratio:.3f}")
    print(f"learner tokens/s ratio new/old: {rates['new'] / rates['old']:.2f}")
    print(f"learner tokens/s ratio packed/sorted: {rates['packed'] / rates['new']:.2f}")
    print(f"learner tokens/s vs raw fwd+bwd: {rates['new'] / raw_rate:.2f}")


if __name__ == "__main__":
    main()
