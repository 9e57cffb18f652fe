"""Writes the PyTorch -> Triton showcase data: 20 small elementwise and row-reduction functions,
each an item with the PyTorch reference, the signature to implement and three test cases.
14 go to train.jsonl, 6 (HELDOUT: four elementwise, two reductions) to heldout.jsonl.

    python examples/pytorch_to_triton/generate.py    # (re)writes the data; already committed
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

VECTOR = [{"shape": [1000]}, {"shape": [4096]}, {"shape": [333]}]  # 1-D float32, standard normal
MATRIX = [{"shape": [8, 100]}, {"shape": [16, 256]}, {"shape": [5, 37]}]  # (rows, cols), cols <= 256

# name -> (signature, body, per-case extra args after the tensors, tensor arity, shapes)
FUNCTIONS = {
    "relu": ("x", "return torch.relu(x)", [], 1, VECTOR),
    "add": ("x, y", "return x + y", [], 2, VECTOR),
    "mul": ("x, y", "return x * y", [], 2, VECTOR),
    "sub": ("x, y", "return x - y", [], 2, VECTOR),
    "scale_shift": ("x, scale: float, shift: float", "return x * scale + shift", [2.5, -1.0], 1, VECTOR),
    "sigmoid": ("x", "return torch.sigmoid(x)", [], 1, VECTOR),
    "tanh": ("x", "return torch.tanh(x)", [], 1, VECTOR),
    "leaky_relu": ("x, slope: float", "return torch.where(x > 0, x, x * slope)", [0.1], 1, VECTOR),
    "square": ("x", "return x * x", [], 1, VECTOR),
    "abs_diff": ("x, y", "return (x - y).abs()", [], 2, VECTOR),
    "clamp": ("x, low: float, high: float", "return x.clamp(low, high)", [-0.5, 0.5], 1, VECTOR),
    "exp": ("x", "return torch.exp(x)", [], 1, VECTOR),
    "silu": ("x", "return x * torch.sigmoid(x)", [], 1, VECTOR),
    "axpy": ("a: float, x, y", "return a * x + y", None, 2, VECTOR),
    "maximum": ("x, y", "return torch.maximum(x, y)", [], 2, VECTOR),
    "row_sum": ("x", "return x.sum(dim=1)", [], 1, MATRIX),
    "row_max": ("x", "return x.amax(dim=1)", [], 1, MATRIX),
    "row_mean": ("x", "return x.mean(dim=1)", [], 1, MATRIX),
    "softmax": ("x", "return torch.softmax(x, dim=1)", [], 1, MATRIX),
    "row_l2_norm": ("x", "return torch.sqrt((x * x).sum(dim=1))", [], 1, MATRIX),
}
HELDOUT = {"scale_shift", "leaky_relu", "silu", "maximum", "softmax", "row_l2_norm"}

PROMPT = """Rewrite this PyTorch function as a Triton kernel.

```python
{reference}```

{inputs} Write a `@triton.jit` kernel and a Python function `def {name}({signature})` that \
allocates the output, launches the kernel and returns the output. Compute the result in the \
kernel, not with torch operations. Reply with one ```python code block that imports torch, \
triton and triton.language as tl."""


def reference_source(name: str, signature: str, body: str) -> str:
    return f"import torch\n\n\ndef {name}({signature}):\n    {body}\n"


def item(name: str) -> dict:
    signature, body, extra, arity, shapes = FUNCTIONS[name]
    reference = reference_source(name, signature, body)
    if shapes is MATRIX:
        inputs = (
            "x is a contiguous 2-D float32 tensor (rows, cols) with at most 256 columns; reduce each row."
        )
    else:
        subject, plural = ("x and y are", "s") if arity == 2 else ("x is", "")
        inputs = f"{subject} a contiguous 1-D float32 tensor{plural}."
    cases = []
    for seed, shape in enumerate(shapes):
        tensors = [dict(shape) for _ in range(arity)]
        args = [0.75, *tensors] if extra is None else [*tensors, *extra]  # axpy takes the scalar first
        cases.append({"name": f"{'x'.join(map(str, shape['shape']))}", "seed": seed, "args": args})
    prompt = PROMPT.format(reference=reference, inputs=inputs, name=name, signature=signature)
    return {
        "id": name,
        "messages": [{"role": "user", "content": prompt}],
        "function": name,
        "reference": reference,
        "cases": cases,
    }


def main() -> None:
    for split, names in (
        ("train", [n for n in FUNCTIONS if n not in HELDOUT]),
        ("heldout", [n for n in FUNCTIONS if n in HELDOUT]),
    ):
        lines = [json.dumps(item(name)) for name in names]
        (HERE / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{split}: {len(lines)} items")


if __name__ == "__main__":
    main()
