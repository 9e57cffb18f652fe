"""Writes dashboards/rft.json, the provisioned Grafana dashboard, from the panel list below.

python deploy/grafana/make_dashboard.py     # after editing PANELS; tests/unit/test_deploy.py checks
                                            # that the committed JSON is this script's output
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "rft-prometheus"}  # provisioning/datasources/prometheus.yml
OUTPUT = Path(__file__).parent / "dashboards" / "rft.json"
JOB = '{job=~"$job"}'

# (row title, [(panel title, unit, [(PromQL, legend)], kind)]); kind: "timeseries" or "stat".
PANELS = [
    (
        "Progress",
        [
            ("Step", "none", [(f"rft_step{JOB}", "{{job}}")], "stat"),
            ("Policy version", "none", [(f"rft_policy_version{JOB}", "{{job}}")], "stat"),
            ("Held-out accuracy", "percentunit", [(f"rft_heldout_accuracy{JOB}", "{{job}}")], "stat"),
            ("Rollouts trained", "none", [(f"rft_samples_trained_total{JOB}", "{{job}}")], "stat"),
        ],
    ),
    (
        "Throughput and step time",
        [
            (
                "Rollout throughput",
                "none",
                [
                    (f"rft_rollout_tokens_per_second{JOB}", "{{job}} tokens/s"),
                    (f"rate(rft_samples_trained_total{JOB}[5m])", "{{job}} rollouts trained/s"),
                ],
                "timeseries",
            ),
            (
                "Step time breakdown",
                "s",
                [
                    (f"rft_step_wall_seconds{JOB}", "{{job}} whole step"),
                    (f"rft_generation_seconds{JOB}", "{{job}} generation"),
                    (f"rft_reward_seconds{JOB}", "{{job}} grading"),
                    (f"rft_learner_step_seconds{JOB}", "{{job}} learner step"),
                    (f"max by (job) (rft_weight_sync_seconds{JOB})", "{{job}} weight sync"),
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Reward",
        [
            (
                "Training reward",
                "none",
                [
                    (f"rft_reward_mean{JOB}", "{{job}} mean"),
                    (f"rft_reward_std{JOB}", "{{job}} std"),
                ],
                "timeseries",
            ),
            (
                "Held-out (greedy)",
                "none",
                [
                    (f"rft_heldout_accuracy{JOB}", "{{job}} accuracy"),
                    (f"rft_heldout_reward_mean{JOB}", "{{job}} mean reward"),
                    (f"rft_heldout_tool_calls_per_episode{JOB}", "{{job}} tool calls per episode"),
                ],
                "timeseries",
            ),
            (
                "Learning signal",
                "none",
                [
                    (f"rft_zero_signal_groups{JOB}", "{{job}} zero-signal groups"),
                    (f"rft_signal_groups{JOB}", "{{job}} groups with signal"),
                    (f"rft_extra_prompts{JOB}", "{{job}} extra prompts (dynamic sampling)"),
                    (f"rft_filter_skipped_prompts{JOB}", "{{job}} prompts skipped (difficulty filter)"),
                    (f"rft_truncated_completions_fraction{JOB}", "{{job}} completions at max length"),
                    (f"rft_completion_length_mean{JOB}", "{{job}} mean completion tokens"),
                    (f"rft_token_mismatch_samples{JOB}", "{{job}} samples refused (tokens changed)"),
                ],
                "timeseries",
            ),
            (
                "Grader errors and hacks",
                "percentunit",
                [
                    (
                        f"sum by (job) (rate(rft_grader_errors_total{JOB}[15m]))"
                        f" / sum by (job) (rate(rft_rollouts_scored_total{JOB}[15m]))",
                        "{{job}} grader error rate",
                    ),
                    (f"rft_grader_hack_rate{JOB}", "{{job}} {{grader}} hack rate"),
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Importance sampling and mismatch",
        [
            (
                "Truncated IS weights",
                "none",
                [
                    (f"rft_is_weight_mean{JOB}", "{{job}} mean"),
                    (f"rft_is_weight_max{JOB}", "{{job}} max"),
                    (f"rft_is_truncated_fraction{JOB}", "{{job}} fraction truncated"),
                ],
                "timeseries",
            ),
            (
                "Mismatch KL and KL to reference",
                "none",
                [
                    (f"rft_mismatch_kl{JOB}", "{{job}} mismatch KL (engine vs learner)"),
                    (f"rft_kl_ref{JOB}", "{{job}} KL to reference"),
                ],
                "timeseries",
            ),
            (
                "Policy",
                "none",
                [
                    (f"rft_entropy{JOB}", "{{job}} entropy"),
                    (
                        f"rft_clip_fraction{JOB}",
                        "{{job}} clip fraction (0 until several optimizer steps per batch)",
                    ),
                    (f"rft_grad_norm{JOB}", "{{job}} grad norm"),
                    (f"rft_loss{JOB}", "{{job}} loss"),
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Staleness, weight sync, workers",
        [
            (
                "Rollout staleness (policy versions)",
                "none",
                [
                    (f"rft_staleness_max{JOB}", "{{job}} max lag trained"),
                    (
                        "histogram_quantile(0.9, sum by (job, le) "
                        f"(rate(rft_rollout_staleness_bucket{JOB}[5m])))",
                        "{{job}} p90 lag",
                    ),
                    (f"rate(rft_stale_rollouts_dropped_total{JOB}[5m])", "{{job}} dropped/s"),
                ],
                "timeseries",
            ),
            (
                "Weight sync latency",
                "s",
                [
                    (
                        f"max by (job, worker) (rft_weight_sync_worker_seconds{JOB})",
                        "{{job}} {{worker}} sync",
                    ),
                    (
                        f"max by (job, worker) (rft_weight_sync_pause_seconds{JOB})",
                        "{{job}} {{worker}} paused",
                    ),
                ],
                "timeseries",
            ),
            (
                "Workers",
                "none",
                [
                    (f"rft_workers{JOB}", "{{job}} {{kind}} workers"),
                    ('up{component!="", job=~"$job"}', "{{job}} {{component}} {{instance}} up"),
                    (
                        f"increase(rft_rollout_workers_replaced_total{JOB}[15m])",
                        "{{job}} rollout workers replaced (15 min)",
                    ),
                    (
                        f"increase(rft_learner_restarts_total{JOB}[15m])",
                        "{{job}} learner group restarts (15 min)",
                    ),
                ],
                "timeseries",
            ),
            (
                "Learner ranks",
                "s",
                [(f"rft_learner_rank_step_seconds{JOB}", "{{job}} {{worker}} step")],
                "timeseries",
            ),
        ],
    ),
]


def panel(panel_id: int, title: str, unit: str, queries: list, kind: str, x: int, y: int, width: int) -> dict:
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": width, "h": 4 if kind == "stat" else 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard() -> dict:
    panels, y, next_id = [], 0, 1
    for row_title, row_panels in PANELS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        next_id, y = next_id + 1, y + 1
        width = 24 // min(len(row_panels), 4) if row_panels[0][3] == "stat" else 12
        for i, (title, unit, queries, kind) in enumerate(row_panels):
            x = (i * width) % 24
            if i and x == 0:
                y += 8
            panels.append(panel(next_id, title, unit, queries, kind, x, y, width))
            next_id += 1
        y += 4 if row_panels[0][3] == "stat" else 8
    return {
        "uid": "rft-training",
        "title": "rft: reinforcement fine-tuning",
        "tags": ["rft"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "job",
                    "label": "job",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(rft_step, job)", "refId": "jobs"},
                    "definition": "label_values(rft_step, job)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "current": {"text": "All", "value": "$__all"},
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(OUTPUT)
