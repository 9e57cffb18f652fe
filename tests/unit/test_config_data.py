"""Bad input stops early with an error that names the field, line or path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.config import ConfigError
from core.model_store import ModelNotFoundError, resolve_model_path
from services.cli import app
from services.config import load_config
from services.orchestrator.data import DatasetError, PromptOrder, load_items

EXAMPLE = Path(__file__).parents[2] / "examples" / "arithmetic.yaml"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "a", "prompt": "1+1="}) + "\n")
    grader = tmp_path / "grader.py"
    grader.write_text("def grade(sample, item):\n    return 1.0\n")
    path = tmp_path / "job.yaml"
    path.write_text(f"data:\n  train: train.jsonl\nreward:\n  grader:\n    source: grader.py\n{extra}")
    return path


def test_example_config_loads_with_paths_relative_to_it():
    cfg = load_config(EXAMPLE)
    assert Path(cfg.data.train).is_file() and Path(cfg.reward.grader.source).is_file()


def test_unknown_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.kl_coeff: unknown field"):
        load_config(write_config(tmp_path, "algorithm:\n  kl_coeff: 0.1\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.temperature:.*'hot'"):
        load_config(write_config(tmp_path, "rollout:\n  temperature: hot\n"))


def test_override_applies_and_is_validated(tmp_path):
    cfg = load_config(write_config(tmp_path), ["algorithm.kl_coef=0.05", "steps=3"])
    assert cfg.algorithm.kl_coef == 0.05 and cfg.steps == 3
    with pytest.raises(ConfigError, match=r"steps:"):
        load_config(write_config(tmp_path), ["steps=zero"])


def test_grader_path_from_an_override_is_made_absolute(tmp_path, monkeypatch):
    """A relative `-o reward.grader.source=` that exists from the working directory (not from the
    config's folder) becomes absolute: the sandbox opens it from elsewhere."""
    config = write_config(tmp_path)
    elsewhere = tmp_path / "cwd"
    (elsewhere / "graders").mkdir(parents=True)
    (elsewhere / "graders" / "strict.py").write_text("def grade(sample, item):\n    return 0.0\n")
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config, ["reward.grader.source=graders/strict.py"])
    assert cfg.reward.grader.source == str(elsewhere / "graders" / "strict.py")


def test_malformed_dataset_line_names_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:3: not valid JSON"):
        load_items(data)
    data.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: needs 'messages'"):
        load_items(data)
    data.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: duplicate id"):
        load_items(data)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        resolve_model_path(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("model:\n  path: /no/such/model\n", "model.path: /no/such/model"),
        ("rollout:\n  samples_per_prompt: many\n", "rollout.samples_per_prompt"),
    ],
)
def test_rft_run_fails_before_any_actor_starts(tmp_path, extra, expected):
    import ray

    result = CliRunner().invoke(
        app, ["run", str(write_config(tmp_path, extra)), "-o", f"run_root={tmp_path}/runs"]
    )
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not ray.is_initialized()


def test_rft_run_names_the_bad_dataset_line(tmp_path, tiny_model_dir):
    config = write_config(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    result = CliRunner().invoke(
        app, ["run", str(config), "-o", f"run_root={tmp_path}/runs", "-o", f"model.path={tiny_model_dir}"]
    )
    assert result.exit_code == 2, result.output
    assert "train.jsonl:2: not valid JSON" in result.output


def test_example_extra_heldout_path_is_relative_to_the_config():
    paraphrased = Path(load_config(EXAMPLE).eval.extra_heldout["paraphrased"])
    assert paraphrased.is_file() and paraphrased.name == "heldout_paraphrased.jsonl"


def test_an_extra_heldout_set_reusing_an_id_is_refused_naming_both_sets(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, "eval:\n  extra_heldout:\n    reworded: reworded.jsonl\n")
    (tmp_path / "reworded.jsonl").write_text(json.dumps({"id": "a", "prompt": "one plus one?"}) + "\n")
    result = CliRunner().invoke(
        app, ["run", str(config), "-o", f"run_root={tmp_path}/runs", "-o", f"model.path={tiny_model_dir}"]
    )
    assert result.exit_code == 2, result.output
    assert "ids in both data.train and eval.extra_heldout.reworded: ['a']" in result.output


def test_prompt_order_is_a_function_of_the_cursor():
    straight = PromptOrder(num_items=7, seed=3)
    first, second = straight.take(5), straight.take(6)
    resumed = PromptOrder(num_items=7, seed=3, cursor=5)
    assert resumed.take(6) == second
    assert sorted(first + second[:2]) == list(range(7))  # each epoch is a permutation
    assert PromptOrder(num_items=7, seed=4).take(5) != first
