"""The batches of the rejection_sft and dpo stage kinds: rejection keeps exactly the rollouts that
pass, online pairs are each group's best and worst, preference files are tokenized as
demonstrations are (bad rows named), and an offline stage's reference is taken at its start and
read back, not re-taken, by a run resumed inside it."""

from __future__ import annotations

import json

import pytest

from core.model_store import ensure_default_model
from reward_workers.interface import ScoredRollout
from rollout_workers.interface import Rollout
from services.config import StageConfig
from services.orchestrator.data import DatasetError
from services.orchestrator.demonstrations import load_demonstrations, load_preference_pairs
from services.orchestrator.preferences import StageReference, online_pairs_batch
from services.orchestrator.rejection import rejection_batch
from services.orchestrator.stages import Stage

GROUP = 4


def scored(prompt: str, rewards: list[float], visit: int = 0) -> list[ScoredRollout]:
    return [
        ScoredRollout(
            Rollout(prompt, visit * GROUP + k, [1, 2], [3 + k, 4], [-0.5, -0.25], 0, "stop", f"answer {k}"),
            reward,
        )
        for k, reward in enumerate(rewards)
    ]


STEP = scored("a", [0.0, 1.0, 0.5, 1.0]) + scored("b", [0.2] * GROUP) + scored("c", [0.0, 0.3, 0.9, 0.1])


def test_rejection_keeps_exactly_the_rollouts_at_or_over_the_threshold():
    built = rejection_batch(3, STEP, GROUP, min_reward=0.9)
    kept = [s.sample_id for s in built.batch.samples]
    assert kept == ["a#1", "a#3", "c#2"]
    assert built.batch.objective == "sft" and all(s.advantage == 0 for s in built.batch.samples)
    assert built.extra == {"rejection_pass_rate": 3 / 12}
    assert (built.zero_signal_groups, built.signal_groups) == (1, 2)


def test_rejection_without_a_threshold_keeps_the_best_of_each_group_with_signal():
    built = rejection_batch(3, STEP, GROUP, min_reward=None)
    assert [s.sample_id for s in built.batch.samples] == ["a#1", "c#2"]  # a's tie: the first; b is flat


def test_online_pairs_are_each_groups_best_and_worst_against_the_scored_reference():
    scores = {}

    def score_sequences(samples):  # stands in for the learner's Σ log π: one number per sample
        scores.update({s.sample_id: -float(len(scores) + 1) for s in samples})
        return [scores[s.sample_id] for s in samples]

    stage = Stage(0, StageConfig(kind="dpo", steps=2, online=True, min_margin=0.5), 0)
    built = online_pairs_batch(stage, 7, STEP, GROUP, score_sequences)
    samples = built.batch.samples
    # a: 1.0 vs 0.0 (margin 1 > 0.5); b flat; c: 0.9 vs 0.0 (margin 0.9).
    assert [(s.sample_id, s.pair_id, s.preferred) for s in samples] == [
        ("a#1", "a/0@7", True),
        ("a#0", "a/0@7", False),
        ("c#2", "c/0@7", True),
        ("c#0", "c/0@7", False),
    ]
    assert [s.reference_logprob for s in samples] == [scores[s.sample_id] for s in samples]
    assert built.batch.objective == "dpo" and built.extra == {"dpo_pairs": 2}
    tight = Stage(0, StageConfig(kind="dpo", steps=2, online=True, min_margin=0.95), 0)
    assert [s.pair_id for s in online_pairs_batch(tight, 7, STEP, GROUP, score_sequences).batch.samples] == [
        "a/0@7"
    ] * 2


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_default_model())


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def test_a_preference_pair_is_two_demonstrations_of_one_prompt(tmp_path, tokenizer):
    pairs_file = write_jsonl(
        tmp_path / "pairs.jsonl", [{"id": "q", "messages": QUESTION, "chosen": "5", "rejected": "6"}]
    )
    [pair] = load_preference_pairs(pairs_file, tokenizer, max_prompt_tokens=256)
    demos = write_jsonl(
        tmp_path / "demos.jsonl",
        [{"messages": QUESTION + [{"role": "assistant", "content": answer}]} for answer in ("5", "6")],
    )
    chosen, rejected = load_demonstrations(demos, tokenizer, max_prompt_tokens=256)
    assert pair.prompt_ids == chosen.prompt_ids == rejected.prompt_ids
    assert (pair.chosen_ids, pair.rejected_ids) == (chosen.completion_ids, rejected.completion_ids)
    [plain] = load_preference_pairs(
        write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}]),
        tokenizer,
        max_prompt_tokens=256,
    )
    eos = tokenizer.eos_token_id
    assert plain.chosen_ids == tokenizer(" 5", add_special_tokens=False)["input_ids"] + [eos]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": QUESTION, "chosen": "5"}, r"pairs.jsonl:2: field 'rejected' must be a non-empty"),
        ({"chosen": "5", "rejected": "6"}, r"pairs.jsonl:2: a preference pair needs 'prompt'"),
        (
            {"messages": QUESTION + [{"role": "assistant", "content": "5"}], "chosen": "5", "rejected": "6"},
            r"pairs.jsonl:2: field 'messages' ends with an assistant turn",
        ),
    ],
)
def test_a_bad_preference_pair_names_its_line_and_field(tmp_path, tokenizer, row, message):
    good = {"messages": QUESTION, "chosen": "5", "rejected": "6"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(DatasetError, match=message):
        load_preference_pairs(path, tokenizer, max_prompt_tokens=256)


def test_the_reference_is_taken_at_the_stage_start_and_read_back_inside_it(tmp_path, tokenizer):
    rows = [
        {"id": f"q{i}", "prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": " 0"} for i in (0, 1, 2)
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows), tokenizer, 256)
    stage = Stage(1, StageConfig(kind="dpo", steps=4, data="pairs.jsonl", batch_size=2), first_step=5)
    calls = []

    def score_sequences(samples):  # the weights at the stage's start, as one number per sample
        calls.append(len(samples))
        return [-float(len(s.completion_ids)) - 0.5 * s.preferred for s in samples]

    path = tmp_path / "run" / "stages" / "2-dpo-reference.json"
    with pytest.raises(RuntimeError, match="2-dpo-reference.json is missing"):
        StageReference(path, pairs).take(at_stage_start=False, score_sequences=score_sequences)
    first = StageReference(path, pairs)
    first.take(at_stage_start=True, score_sequences=score_sequences)
    assert calls == [6] and path.exists()
    resumed = StageReference(path, pairs)  # a run resumed at step 7, inside the stage
    resumed.take(at_stage_start=False, score_sequences=score_sequences)
    assert calls == [6]  # read back, not scored again with the moved weights
    batch = resumed.batch(stage, 7, seed=0, policy_version=7)
    assert batch.objective == "dpo" and len(batch.samples) == 4
    assert batch.samples == first.batch(stage, 7, seed=0, policy_version=7).samples
    for s in batch.samples:
        assert s.reference_logprob == -float(len(s.completion_ids)) - 0.5 * s.preferred
    assert [s.preferred for s in batch.samples] == [True, False, True, False]
