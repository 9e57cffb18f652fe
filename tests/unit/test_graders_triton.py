"""triton_kernel: model-written Triton kernels run in the real sandbox, in a fresh interpreter
with Triton's interpreter mode (no GPU here), against real PyTorch references.

One sandbox grades every sample (starting the runner, which imports torch, is the slow part);
each sample starts a fresh Python that imports torch and triton (seconds on a loaded box).
"""

from __future__ import annotations

import pytest

from reward_workers.config import RewardConfig
from reward_workers.sandbox import GraderSandbox

pytestmark = pytest.mark.slow

SPEC = {"type": "triton_kernel", "timeout_s": 100}
LIMITS = dict(timeout_s=120.0, cpu_s=60, memory_mb=4096)

RELU_ITEM = {
    "id": "relu",
    "function": "relu",
    "reference": "def relu(x):\n    return torch.relu(x)\n",
    "cases": [
        {"seed": 0, "args": [{"shape": [1000]}]},
        {"name": "matrix", "seed": 1, "args": [{"shape": [16, 50], "dtype": "float32"}]},
    ],
}
ROW_SUM_ITEM = {
    "id": "row_sum",
    "function": "row_sum",
    "reference": "def row_sum(x):\n    return x.sum(dim=1)\n",
    "cases": [{"seed": 3, "args": [{"shape": [8, 100], "low": 0.0, "high": 1.0}]}],
}

KERNEL = """
import torch
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, {body}, mask=mask)


def relu(x):
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    relu_kernel[(triton.cdiv(n, 256),)](x, out, n, BLOCK=256)
    return {result}
"""


def kernel(body: str = "tl.maximum(x, 0.0)", result: str = "out") -> str:
    return "Here is the kernel:\n```python\n" + KERNEL.format(body=body, result=result) + "```\n"


ROW_SUM = """```python
import torch
import triton
import triton.language as tl


@triton.jit
def row_sum_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(x, axis=0))


def row_sum(x):
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    row_sum_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
```"""


def grade(cases: list[tuple[str, dict]], spec: dict = SPEC):
    cfg = RewardConfig(grader=spec, **LIMITS)
    with GraderSandbox(cfg.grader, cfg) as sandbox:
        return sandbox.grade([{"output_text": text} for text, _ in cases], [item for _, item in cases])


def test_correct_kernels_score_one_and_wrong_or_broken_ones_partial():
    broken = kernel().replace("def relu(x):", "def relu(x)")  # a syntax error
    only_positive = kernel(body="tl.abs(x)")  # right only where the input is >= 0 everywhere
    positive_item = {
        **RELU_ITEM,
        "cases": [
            {"seed": 0, "args": [{"shape": [64], "low": 0.0, "high": 1.0}]},
            {"seed": 1, "args": [{"shape": [64]}]},
        ],
    }
    results = grade(
        [
            (kernel(), RELU_ITEM),
            (ROW_SUM, ROW_SUM_ITEM),
            (broken, RELU_ITEM),
            (only_positive, positive_item),
            ("relu(x) = max(x, 0)", RELU_ITEM),
        ]
    )
    assert [r.error for r in results] == [None] * 5
    right, row_sum, syntax, half, prose = results
    assert (right.reward, right.hack_flags) == (1.0, []), right.diagnostics
    assert right.components == {"format": 1.0, "compiles": 1.0, "correct": 1.0}
    assert (row_sum.reward, row_sum.hack_flags) == (1.0, []), row_sum.diagnostics
    assert syntax.reward == pytest.approx(0.1) and syntax.components["compiles"] == 0.0
    assert "SyntaxError" in syntax.diagnostics[0]
    assert half.reward == pytest.approx(0.1 + 0.1 + 0.8 * 0.5) and half.hack_flags == []
    assert half.diagnostics == [
        f"case_1 failed: max abs error {half.diagnostics[0].split()[5]} (atol 0.0001, rtol 0.0001)"
    ]
    assert (prose.reward, prose.components["format"]) == (0.0, 0.0)


HACKS = {  # reply -> the flag it must raise
    kernel(result="x"): "passthrough",  # launches a kernel, returns the input
    kernel(body="x * 0.0"): "no_op",  # writes zeros
    kernel(result="torch.relu(x)"): "calls_torch_op",  # launches, then computes with torch
    kernel(result="x.clamp(min=0)"): "calls_torch_op",
    kernel(result="torch.tensor([max(v, 0.0) for v in x.view(-1).tolist()]).view(x.shape)"): "calls_torch_op",
    (
        "```python\nimport torch\ndef relu(x):\n    return torch.where(x > 0, x, torch.zeros_like(x))\n```"
    ): "no_kernel_launch",
    kernel(
        result="[torch.utils._python_dispatch._pop_mode(), out][1]"
    ): "edits_harness",  # drops the op trace
}


def test_hacks_score_zero_with_a_flag():
    results = grade([(reply, RELU_ITEM) for reply in HACKS])
    for flag, result in zip(HACKS.values(), results):
        assert result.error is None and result.reward == 0.0 and flag in result.hack_flags, (flag, result)
    assert "aten.relu" in " ".join(results[2].diagnostics)


def test_bad_items_and_specs_are_errors_naming_the_field():
    results = grade(
        [
            (kernel(), {**RELU_ITEM, "cases": []}),
            (kernel(), {**RELU_ITEM, "reference": "def other(x):\n    return x\n"}),
            (kernel(), {**RELU_ITEM, "cases": [{"seed": 0, "args": [{"shape": [4], "dtype": "complex64"}]}]}),
            (kernel(), {**RELU_ITEM, "cases": [{"name": "a", "seed": 0, "args": [1.0]}] * 2}),
        ]
    )
    assert "cases must be a non-empty list" in results[0].error
    assert "the item's reference does not define 'relu'" in results[1].error
    assert "dtype 'complex64' is not one of" in results[2].error
    assert "case names repeat: ['a', 'a']" in results[3].error
    with pytest.raises(ValueError, match="format_weight \\+ compile_weight must be at most 1"):
        RewardConfig(grader={**SPEC, "format_weight": 0.6, "compile_weight": 0.6}, **LIMITS)
    with pytest.raises(ValueError, match="timeout_s \\(100 s in all\\) must be below reward.timeout_s"):
        RewardConfig(grader=SPEC, **{**LIMITS, "timeout_s": 50})


SOFTMAX = """```python
import torch
import triton
import triton.language as tl


@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=-float("inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(out_ptr + row * n_cols + cols, e / tl.sum(e, axis=0), mask=mask)


def softmax(x):
    out = torch.empty_like(x)
    softmax_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
```"""


def test_showcase_items_run_and_a_correct_softmax_scores_one():
    """Every pytorch_to_triton item's reference runs on its cases (replies without code start no
    interpreter), and the held-out softmax item accepts a correct kernel."""
    import json
    from pathlib import Path

    from services.config import load_config

    folder = Path(__file__).parents[2] / "examples" / "pytorch_to_triton"
    items = [
        json.loads(line) for split in ("train", "heldout") for line in (folder / f"{split}.jsonl").open()
    ]
    assert len(items) == 20 and len({item["id"] for item in items}) == 20
    spec = load_config(folder / "job.yaml").reward.grader.model_dump()
    softmax_item = next(item for item in items if item["id"] == "softmax")
    results = grade(
        [("I do not know Triton.", item) for item in items] + [(SOFTMAX, softmax_item)],
        {**spec, "timeout_s": 100},
    )
    assert [(r.reward, r.error) for r in results[:-1]] == [(0.0, None)] * 20
    assert (results[-1].reward, results[-1].hack_flags) == (1.0, []), results[-1].diagnostics
