"""triton_kernel: run a model-written Triton kernel against the item's PyTorch reference on
generated inputs; partial credit for format, loading, and the share of cases matched.

The item gives (template fields of the spec, defaults in brackets):
- `function` [{{item.function}}]: the name of the function the model must define;
- `reference` [{{item.reference}}]: Python source defining that function with torch (the
  dataset's code: run here, in the sandbox's grading child, never in the candidate's process);
- `cases` [{{item.cases}}]: [{"name"?, "seed", "args": [number | {"shape", "dtype", "low",
  "high"}]}], the inputs generated from the seed (triton_harness.make_inputs).
The model's code (the last ```python block) runs in a fresh interpreter (triton_harness.py,
started with code_tests.run_process: its own process group, `timeout_s` for all cases, the
sandbox's rlimits), on a GPU when the harness sees one and `device` allows it, else in Triton's
interpreter (TRITON_INTERPRET=1, numpy-backed). Only its outputs come back; they are compared
here with torch.allclose(atol, rtol), same shape and dtype required.

reward = format_weight * format + compile_weight * compiles + (rest) * share of cases matched, where
format = the reply has a fenced code block with `def <function>(`, compiles = that code runs and
defines the function (code that never names the function, or does not parse, is judged without
importing torch). Anti-hacking probes (reward 0 with the flag):
- passthrough: a case's output equals one of its input tensors unchanged where the reference's
  does not (the kernel copied or returned an input);
- no_op: a case's output is all zeros where the reference's is not (nothing was written);
- no_kernel_launch: the function returned without launching any @triton.jit kernel;
- calls_torch_op: while the function ran it dispatched a torch compute op (anything but
  allocation, constant fills, views and copies/casts) or read tensor values into Python/numpy;
- edits_harness: the function removed the harness's tracing or launch hooks.
See triton_harness.py for exactly what is traced and what is not.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
from pathlib import Path

from reward_workers.graders import triton_harness
from reward_workers.graders.code_tests import MAX_DIAGNOSTIC_CHARS, MAX_OUTPUT_BYTES, run_process
from reward_workers.graders.templates import GraderInputError, last_code_block, render, render_text

HARNESS = Path(__file__).with_name("triton_harness.py").read_text()  # read now: the sandbox may hide it
PYTHON_BLOCK = ("python", "py", "python3")


def normalized_cases(cases) -> list[dict]:
    if not isinstance(cases, list) or not cases:
        raise GraderInputError("triton_kernel: the item's cases must be a non-empty list")
    normalized = []
    for i, case in enumerate(cases):
        if (
            not isinstance(case, dict)
            or not isinstance(case.get("args"), list)
            or not isinstance(case.get("seed", 0), int)
        ):
            raise GraderInputError(f"triton_kernel: case {i} must be {{'seed': int, 'args': [...]}}")
        normalized.append(
            {"name": str(case.get("name", f"case_{i}")), "seed": case.get("seed", 0), "args": case["args"]}
        )
    names = [case["name"] for case in normalized]
    if len(set(names)) != len(names):
        raise GraderInputError(f"triton_kernel: case names repeat: {names}")
    return normalized


def reference_outputs(source: str, function: str, cases: list[dict], torch) -> list[tuple[list, list]]:
    """(inputs, reference outputs) per case: the dataset's reference run on the generated inputs."""
    namespace = {"__name__": "reference", "torch": torch, "math": math}
    try:
        exec(compile(source, "<reference>", "exec"), namespace)
        reference = namespace[function]
    except Exception as e:  # noqa: BLE001 - the item is broken, not the sample
        raise GraderInputError(
            f"triton_kernel: the item's reference does not define {function!r}: {e}"
        ) from None
    results = []
    for case in cases:
        try:
            inputs = triton_harness.make_inputs(case["args"], case["seed"])
        except ValueError as e:
            raise GraderInputError(f"triton_kernel: case {case['name']}: {e}") from None
        with torch.no_grad():
            outputs = triton_harness.as_outputs(
                reference(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
            )
        results.append((inputs, outputs))
    return results


def _close(a, b, spec, torch) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.allclose(a.double(), b.double(), atol=spec["atol"], rtol=spec["rtol"], equal_nan=True)
    )


def _trivial_match(got: list, want: list, inputs: list, spec, torch) -> str | None:
    """'passthrough' / 'no_op' if an output is an input unchanged / all zeros where the reference's is not."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    for output, expected in zip(got, want):
        for x in tensors:
            if (
                x.shape == output.shape
                and torch.equal(output.double(), x.double())
                and not _close(x.to(expected.dtype), expected, spec, torch)
            ):
                return "passthrough"
        zeros = torch.zeros_like(expected)
        if output.shape == expected.shape and not output.any() and not _close(zeros, expected, spec, torch):
            return "no_op"
    return None


def _run_harness(
    code: str, function: str, cases: list[dict], expected: list, spec
) -> tuple[dict, list, str | None]:
    """The harness's messages: (first message, per-case messages, why it stopped early or None)."""
    nonce = secrets.token_hex(16)
    request = json.dumps(
        {
            "code": code,
            "function": function,
            "cases": cases,
            "expected": expected,
            "device": spec["device"],
            "nonce": nonce,
        }
    ).encode()
    output, status, _, stopped = run_process(
        [sys.executable, "-I", "-c", HARNESS], request, time.monotonic() + spec["timeout_s"]
    )
    messages = []
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("nonce") == nonce:
            messages.append(message)
    head = (
        messages[0]
        if messages
        else {
            "load_error": f"the harness stopped before loading the code: "
            f"{stopped or 'exit status ' + str(status)}"
        }
    )
    done = any(m.get("done") for m in messages)
    why = None if done else (stopped or "the candidate's process exited before all cases ran")
    return head, [m for m in messages if "case" in m], why


def build(spec: dict):
    import torch  # in the runner, once: the grading children fork with it loaded

    torch.set_num_threads(1)
    correct_weight = 1.0 - spec["format_weight"] - spec["compile_weight"]

    def grade(sample: dict, item: dict) -> dict:
        function = render_text(spec["function"], sample, item)
        if not function.isidentifier():
            raise GraderInputError(f"triton_kernel: function {function!r} is not a Python name")
        cases = normalized_cases(render(spec["cases"], sample, item))
        references = reference_outputs(render_text(spec["reference"], sample, item), function, cases, torch)
        expected = [
            [{"shape": list(o.shape), "dtype": str(o.dtype).removeprefix("torch.")} for o in outs]
            for _, outs in references
        ]
        if (
            sum(o.numel() * o.element_size() for _, outs in references for o in outs) * 4 // 3
            > MAX_OUTPUT_BYTES // 2
        ):
            raise GraderInputError(
                f"triton_kernel: the cases' outputs exceed {MAX_OUTPUT_BYTES // 2} bytes encoded"
            )
        text = render_text(spec["code"], sample, item)
        code = last_code_block(text, PYTHON_BLOCK)
        formatted = code != text and re.search(rf"^\s*def\s+{function}\s*\(", code, re.MULTILINE) is not None
        if re.search(rf"\b{function}\b", code):
            head, reports, stopped = _run_harness(code, function, cases, expected, spec)
        else:  # it cannot define the function: no need to start an interpreter
            head, reports, stopped = {"load_error": f"the code never names {function!r}"}, [], None
        loaded = bool(head.get("loaded"))
        flags, diagnostics, matched = set(), [], 0
        if not loaded:
            diagnostics.append(f"code did not load: {head.get('load_error', '')[-MAX_DIAGNOSTIC_CHARS:]}")
        by_name = {r["case"]: r for r in reports}
        for case, (inputs, want) in zip(cases, references):
            report = by_name.get(case["name"])
            if report is None:
                if loaded:
                    diagnostics.append(f"{case['name']} failed: did not run ({stopped})")
                continue
            if report.get("torch_ops") or report.get("host_reads"):
                flags.add("calls_torch_op")
                diagnostics.append(
                    f"{case['name']}: the function ran torch compute ops / host reads "
                    f"{report.get('torch_ops', []) + report.get('host_reads', [])}"
                )
            if report.get("tampered"):
                flags.add("edits_harness")
            if "error" in report:
                diagnostics.append(f"{case['name']} failed: {str(report['error'])[-MAX_DIAGNOSTIC_CHARS:]}")
                continue
            if not report.get("launches"):
                flags.add("no_kernel_launch")
            got = [triton_harness.decode(o) for o in report["outputs"]]
            trivial = _trivial_match(got, want, inputs, spec, torch)
            if trivial:
                flags.add(trivial)
            if all(_close(g, w, spec, torch) for g, w in zip(got, want)):
                matched += 1
            else:
                error = max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want))
                diagnostics.append(
                    f"{case['name']} failed: max abs error {error:.3g} "
                    f"(atol {spec['atol']:g}, rtol {spec['rtol']:g})"
                )
        share = matched / len(cases)
        reward = spec["format_weight"] * formatted + spec["compile_weight"] * loaded + correct_weight * share
        return {
            "reward": 0.0 if flags else reward,
            "hack_flags": sorted(flags),
            "diagnostics": diagnostics,
            "components": {"format": float(formatted), "compiles": float(loaded), "correct": share},
        }

    return grade
