"""`rft report RUN_DIR`: PNG plots of a run's curves (from `metrics.jsonl`) and one HTML page with
them, the per-step numbers, and sample completions with their grader breakdown (from
`samples.jsonl`), written to RUN_DIR/report/ by default."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One PNG per group: (file stem, title, [(metrics.jsonl key, label)]); a key no record has is left out.
PLOTS = [
    (
        "reward",
        "Reward",
        [
            ("reward_mean", "training reward, mean"),
            ("reward_std", "training reward, std"),
            ("heldout_accuracy", "held-out accuracy (greedy)"),
            ("heldout_reward_mean", "held-out mean reward"),
        ],
    ),
    (
        "importance_sampling",
        "Importance sampling and mismatch",
        [
            ("is_weight_mean", "IS weight, mean"),
            ("is_weight_max", "IS weight, max"),
            ("is_truncated_fraction", "fraction truncated"),
            ("mismatch_kl", "mismatch KL (engine vs learner)"),
        ],
    ),
    (
        "policy",
        "Policy",
        [
            ("entropy", "entropy"),
            ("kl_ref", "KL to reference"),
            ("clip_fraction", "clip fraction"),
            ("grad_norm", "grad norm"),
            ("loss", "loss"),
        ],
    ),
    (
        "throughput",
        "Throughput and timing",
        [
            ("rollout_tokens_per_second", "rollout tokens/s"),
            ("learner_step_seconds", "learner step (s)"),
            ("weight_sync_seconds", "weight sync (s)"),
            ("completion_length_mean", "mean completion tokens"),
        ],
    ),
    (
        "signal",
        "Learning signal and staleness",
        [
            ("zero_signal_groups", "zero-signal groups"),
            ("signal_groups", "groups with signal"),
            ("extra_prompts", "extra prompts (dynamic sampling)"),
            ("filter_skipped_prompts", "prompts skipped (difficulty filter)"),
            ("truncated_completions_fraction", "completions at max length"),
            ("staleness_max", "max policy lag trained"),
        ],
    ),
]


def heldout_series(table: dict[int, dict]) -> list[tuple[str, str]]:
    """Every held-out number of the run (sets, components such as format and lenient accuracy)."""
    keys = sorted({key for row in table.values() for key in row if key.startswith("heldout_")})
    return [(key, key.removeprefix("heldout_").replace("_", " ")) for key in keys]


class ReportError(ValueError):
    """A run directory whose files cannot be read; the message names the file and line."""


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{number}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ReportError(f"{path}:{number}: expected a JSON object with a 'step'")
            records.append(record)
    return records


def steps_table(records: list[dict]) -> dict[int, dict]:
    """step -> its numbers; a step recorded twice (a resumed run redoes steps) keeps the later values."""
    table: dict[int, dict] = defaultdict(dict)
    for record in records:
        table[int(record["step"])].update(record)
    return dict(sorted(table.items()))


def curve(table: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (step, float(row[key]))
        for step, row in table.items()
        if isinstance(row.get(key), (int, float))
        and not isinstance(row.get(key), bool)
        and math.isfinite(row[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_group(table: dict[int, dict], title: str, series: list[tuple[str, str]], path: Path) -> bool:
    """One small chart per metric in a grid; False (no file) if the run has none of them."""
    present = [(key, label) for key, label in series if curve(table, key)[0]]
    if not present:
        return False
    columns = 2
    rows = math.ceil(len(present) / columns)
    figure = Figure(figsize=(5 * columns, 3 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (key, label) in enumerate(present):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = curve(table, key)
        axes.plot(steps, values, marker="o", markersize=3)
        axes.set_title(label, fontsize=10)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        for boundary in stage_boundaries(table):  # a job with stages: where each one begins
            axes.axvline(boundary - 0.5, color="grey", linestyle="--", linewidth=1)
    figure.savefig(path, dpi=100)
    return True


def stage_boundaries(table: dict[int, dict]) -> list[int]:
    """The first step of every stage after the first (from the steps' `stage` numbers)."""
    stages = [(step, row["stage"]) for step, row in table.items() if "stage" in row]
    return [step for (_, before), (step, stage) in zip(stages, stages[1:]) if stage != before]


def pick_samples(samples: list[dict], count: int) -> list[dict]:
    """`count` samples spread evenly over the reward range, best first."""
    ranked = sorted(samples, key=lambda s: s.get("reward", 0.0), reverse=True)
    if len(ranked) <= count:
        return ranked
    return [ranked[round(i * (len(ranked) - 1) / max(count - 1, 1))] for i in range(count)]


def component_means(samples: list[dict]) -> dict[str, float]:
    totals: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for name, value in (sample.get("components") or {}).items():
            if isinstance(value, (int, float)):
                totals[name].append(float(value))
    return {name: sum(values) / len(values) for name, values in sorted(totals.items())}


# ---------------------------------------------------------------- HTML


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def curves_section(table: dict[int, dict], images: list[str]) -> str:
    keys = [key for _, _, series in PLOTS for key, _ in series if curve(table, key)[0]]
    rows = [[step] + [row.get(key) for key in keys] for step, row in table.items()]
    figures = "".join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in images)
    return f"<h2>Curves</h2>{figures}<h3>Per step</h3>{html_table(['step', *keys], rows)}"


def samples_section(samples: list[dict], per_step: int) -> str:
    if not samples:
        return "<h2>Samples</h2><p>No samples.jsonl in this run (no step finished).</p>"
    by_step: dict[int, list[dict]] = defaultdict(list)
    for sample in samples:
        by_step[int(sample["step"])].append(sample)
    parts = ["<h2>Samples</h2>"]
    for step in sorted({min(by_step), max(by_step)}):
        step_samples = by_step[step]
        means = component_means(step_samples)
        mean_reward = sum(s.get("reward", 0.0) for s in step_samples) / len(step_samples)
        flagged = sum(bool(s.get("hack_flags")) for s in step_samples)
        errors = sum(bool(s.get("grader_error")) for s in step_samples)
        parts.append(
            f"<h3>Step {step}: {len(step_samples)} rollouts, mean reward {mean_reward:.3f}, "
            f"{errors} grader errors, {flagged} flagged as hacks</h3>"
        )
        parts.append(html_table(["component", "mean"], [[name, value] for name, value in means.items()]))
        for sample in pick_samples(step_samples, per_step):
            components = sample.get("components") or {}
            breakdown = ", ".join(f"{html.escape(str(k))} = {cell(v)}" for k, v in components.items())
            problems = [f"grader error: {sample['grader_error']}"] if sample.get("grader_error") else []
            problems += [f"hack flag: {flag}" for flag in sample.get("hack_flags") or []]
            notes = "".join(f'<p class="error">{cell(problem)}</p>' for problem in problems)
            origin = ", ".join(
                f"{label} {cell(sample[key])}"
                for key, label in (
                    ("policy_version", "policy version"),
                    ("worker_id", "worker"),
                    ("trained", "trained"),
                )
                if key in sample
            )
            parts.append(
                f'<div class="sample"><p><b>{cell(sample.get("sample_id"))}</b> ({origin}) reward '
                f"<b>{cell(sample.get('reward'))}</b>: {breakdown}</p>{notes}{sample_body(sample)}</div>"
            )
    return "".join(parts)


def sample_body(sample: dict) -> str:
    """The completion; of an episode, every turn after the prompt, each labelled with its role
    (and a model turn with its policy version)."""
    turns = sample.get("turns")
    if not isinstance(turns, list):
        return f"<pre>{cell(sample.get('text'))}</pre>"
    rows = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") in ("system", "user") and not rows:
            continue  # the prompt: the same for the whole group
        label = str(turn.get("role"))
        if "policy_version" in turn:
            label += f" (policy version {turn['policy_version']})"
        rows.append(f'<p class="turn"><i>{cell(label)}</i></p><pre>{cell(turn.get("content"))}</pre>')
    reason = f"<p>episode ended: {cell(sample.get('finish_reason'))}</p>" if "finish_reason" in sample else ""
    return "".join(rows) + reason


def summary_section(run_dir: Path) -> str:
    path = run_dir / "summary.json"
    if not path.is_file():
        return "<p>No summary.json (the run has not finished).</p>"
    summary = json.loads(path.read_text())
    sets = {"held-out": (summary.get("heldout_base") or {}, summary.get("heldout_final") or {})}
    sets |= {
        f"held-out {name}": (both["base"], both["final"])
        for name, both in summary.get("heldout_sets", {}).items()
    }
    output = "adapter" if "adapter" in summary else "model"  # a full-weight job's output is a model dir
    return (
        f"<p>{cell(summary.get('steps'))} steps, policy version {cell(summary.get('policy_version'))}, "
        + (
            f"{output} {cell(summary.get(output))}</p>"
            + "".join(
                html_table([name, "base", "final"], base_final_rows(*pair)) for name, pair in sets.items()
            )
        )
    )


def base_final_rows(base: dict, final: dict) -> list[list]:
    """accuracy, mean reward, each grader component (format, lenient accuracy, ...), count."""
    components = sorted({key for key in [*base, *final] if key.startswith("component_")})
    names = ["accuracy", "reward_mean", *components, "count"]
    return [[name.removeprefix("component_"), base.get(name), final.get(name)] for name in names]


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}
.sample{border-top:1px solid #ddd;margin-top:.8em}.error{color:#b00}"""


def write_report(run_dir: Path, output_dir: Path | None = None, samples_per_step: int = 6) -> Path:
    """Write the PNGs and index.html into output_dir (default RUN_DIR/report); returns index.html."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: is {run_dir} a run directory (runs/<job>)?")
    table = steps_table(read_jsonl(metrics_path))
    samples_path = run_dir / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    output_dir = output_dir or run_dir / "report"
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = PLOTS + [("heldout", "Held-out evaluations (greedy)", heldout_series(table))]
    images = [
        f"{stem}.png"
        for stem, title, series in plots
        if plot_group(table, title, series, output_dir / f"{stem}.png")
    ]
    title = f"rft run {run_dir.name}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary_section(run_dir)}"
        f"{curves_section(table, images)}{samples_section(samples, samples_per_step)}</body></html>\n"
    )
    index = output_dir / "index.html"
    index.write_text(page)
    return index
