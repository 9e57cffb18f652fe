"""Runs a model-written Triton kernel on generated inputs, in a fresh `python -I` started by
triton_kernel.py (through code_tests.run_process: the same process group, deadline, output cap
and sandbox limits as code_tests). This process never sees the reference function or its outputs:
it reports the candidate's outputs and what the call did, and the grader compares.

stdin: {"code", "function", "cases": [{"name", "seed", "args"}], "expected": [[{"shape", "dtype"}]],
"device": "auto" | "cpu" | "cuda", "nonce"}. Report, one JSON line each carrying the nonce:
{"loaded": true} or {"load_error"}; per case {"case", "outputs": [{"shape", "dtype", "data"}]
(base64 bytes) or "error", "launches", "torch_ops", "host_reads", "tampered"}; {"done": true}.

What is traced while the candidate function runs (the runtime call trace):
- launches: calls of a @triton.jit kernel's `run` (`kernel[grid](...)`, autotuned or not);
- torch_ops: every aten op dispatched (TorchDispatchMode) that is not allocation, a constant
  fill, a view, or a copy/cast (ALLOWED_ATEN_OPS) — e.g. aten.add, aten.sum, aten._softmax,
  aten.relu, aten.index. Excluded: the Triton interpreter's own copies of the launch arguments
  to and from the host, and (on a GPU) the compiled launch itself, which cannot run torch ops;
  included: torch ops a kernel body runs in interpreter mode (there it is plain Python);
- host_reads: tensor values read into Python or numpy (TorchFunctionMode): .tolist(), .item(),
  .numpy(), __array__, float()/int()/bool() of a tensor;
- tampered: the two modes were taken off their stacks or the launch hooks replaced.
Not detected: code that finds and forges the report (the nonce) through introspection, reads
tensor memory through data_ptr/ctypes, or computes with numpy inside a kernel body in
interpreter mode (a GPU compile would refuse it).
"""

import base64
import json
import os
import sys
import traceback

ALLOWED_ATEN_OPS = {
    # allocation and constant fills (independent of the inputs' values)
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "zeros",
    "zeros_like",
    "new_zeros",
    "ones",
    "ones_like",
    "new_ones",
    "full",
    "full_like",
    "new_full",
    "fill_",
    "zero_",
    "arange",
    "scalar_tensor",
    "lift_fresh",
    # views and metadata
    "view",
    "_unsafe_view",
    "reshape",
    "as_strided",
    "slice",
    "select",
    "t",
    "transpose",
    "permute",
    "expand",
    "squeeze",
    "unsqueeze",
    "flatten",
    "unflatten",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "narrow",
    "view_as",
    "is_contiguous",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "_reshape_alias",
    "resolve_conj",
    "resolve_neg",
    # copies and casts (moving data, not computing the result)
    "clone",
    "copy_",
    "_to_copy",
    "to",
    "contiguous",
    "_copy_from",
}
HOST_READS = {
    "tolist",
    "item",
    "numpy",
    "__array__",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__complex__",
}
UNIFORM_DTYPES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
MAX_ERROR_CHARS = 1500


def make_inputs(args: list, seed: int, device: str = "cpu") -> list:
    """The arguments of one test case: numbers as they are; {"shape", "dtype" (float32), "low",
    "high"} as a tensor (floats: standard normal, or uniform in [low, high); integers: randint in
    [low, high)). Deterministic in `seed` (generated on the CPU, then moved to `device`)."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    values = []
    for i, arg in enumerate(args):
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            values.append(arg)
            continue
        if not isinstance(arg, dict) or not isinstance(arg.get("shape"), list):
            raise ValueError(f"argument {i} must be a number or {{'shape': [...], 'dtype', 'low', 'high'}}")
        shape, dtype_name = [int(n) for n in arg["shape"]], arg.get("dtype", "float32")
        if dtype_name in INTEGER_DTYPES:
            if "low" not in arg or "high" not in arg:
                raise ValueError(f"argument {i}: integer tensors need low and high")
            tensor = torch.randint(
                int(arg["low"]),
                int(arg["high"]),
                shape,
                generator=generator,
                dtype=getattr(torch, dtype_name),
            )
        elif dtype_name in UNIFORM_DTYPES:
            if "low" in arg or "high" in arg:
                low, high = float(arg.get("low", 0.0)), float(arg.get("high", 1.0))
                tensor = torch.rand(shape, generator=generator) * (high - low) + low
            else:
                tensor = torch.randn(shape, generator=generator)
            tensor = tensor.to(getattr(torch, dtype_name))
        else:
            raise ValueError(
                f"argument {i}: dtype {dtype_name!r} is not one of {UNIFORM_DTYPES + INTEGER_DTYPES}"
            )
        values.append(tensor.to(device))
    return values


def as_outputs(value) -> list:
    """A function's result as a list of tensors (a tensor, or a tuple/list of them)."""
    import torch

    outputs = list(value) if isinstance(value, (tuple, list)) else [value]
    for output in outputs:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"returned {type(output).__name__}, expected a tensor or a tuple of tensors")
    return outputs


def encode(tensor) -> dict:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "data": base64.b64encode(flat.view(torch.uint8).numpy().tobytes()).decode(),
    }


def decode(encoded: dict):
    import torch

    raw = torch.frombuffer(bytearray(base64.b64decode(encoded["data"])), dtype=torch.uint8)
    return raw.view(getattr(torch, encoded["dtype"])).reshape(encoded["shape"])


class Tracer:
    """Counts kernel launches and records torch compute ops and host reads while `active`."""

    def __init__(self):
        """Hooks Triton's launches only if the candidate's code imported triton (else it cannot
        launch a kernel, and the import, a second or more, is saved)."""
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        tracer = self
        self.active = False
        self.reset()

        class OpTrace(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if (
                    tracer.active
                    and name.rstrip("_") not in ALLOWED_ATEN_OPS
                    and name not in ALLOWED_ATEN_OPS
                ):
                    tracer.torch_ops.append(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        class HostReadTrace(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if tracer.active and name in HOST_READS:
                    tracer.host_reads.append(f"Tensor.{name}")
                return func(*args, **(kwargs or {}))

        def paused(method):  # triton's own machinery: not the candidate's compute
            def run_untraced(*args, **kwargs):
                was, tracer.active = tracer.active, False
                try:
                    return method(*args, **kwargs)
                finally:
                    tracer.active = was

            return run_untraced

        def counted(method, compiled: bool):
            def launch(*args, **kwargs):
                if not kwargs.get("warmup"):
                    tracer.launches += 1
                return (paused(method) if compiled else method)(*args, **kwargs)

            return launch

        self.hooks = {}
        if "triton" in sys.modules:
            import triton.runtime.interpreter as interpreter
            import triton.runtime.jit as jit

            executor = interpreter.GridExecutor
            self.hooks = {
                (jit.JITFunction, "run"): counted(jit.JITFunction.run, compiled=True),
                (interpreter.InterpretedFunction, "run"): counted(interpreter.InterpretedFunction.run, False),
                (executor, "_init_args_hst"): paused(executor._init_args_hst),
                (executor, "_restore_args_dev"): paused(executor._restore_args_dev),
            }
        for (owner, name), hook in self.hooks.items():
            setattr(owner, name, hook)
        self.modes = (HostReadTrace(), OpTrace())
        self._torch = torch

    def call(self, function, args):
        """function(*args) traced; the modes are entered for this call only."""
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        host_mode, op_mode = self.modes
        with host_mode, op_mode:
            self.active = True
            try:
                result = function(*args)
            finally:
                self.active = False
                self.tampered = not (
                    host_mode in _get_current_function_mode_stack()
                    and op_mode in _get_current_dispatch_mode_stack()
                    and all(getattr(owner, name) is hook for (owner, name), hook in self.hooks.items())
                )
        return result

    def reset(self):
        self.launches, self.torch_ops, self.host_reads, self.tampered = 0, [], [], False


def main():
    request = json.loads(sys.stdin.buffer.read())
    nonce, write, dumps = request["nonce"], os.write, json.dumps
    report = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(2, 1)  # the candidate's prints do not reach the report

    def send(message):
        write(report, (dumps({"nonce": nonce, **message}) + "\n").encode())

    try:  # a syntax error is found before the slow imports
        solution = compile(request["code"], "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        send({"load_error": "".join(traceback.format_exception_only(e)).strip()[-MAX_ERROR_CHARS:]})
        return
    # Triton's cache (default ~/.triton) goes to the sandbox's private /tmp, the one writable place.
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), ".triton"))
    import torch

    device = request["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs: numpy-backed interpreter
    torch.set_num_threads(1)
    namespace = {"__name__": "solution"}
    try:
        exec(solution, namespace)
        function = namespace.get(request["function"])
        if not callable(function):
            raise NameError(f"the code does not define a function {request['function']!r}")
    except BaseException as e:  # noqa: BLE001 - the candidate's failure is its score
        send({"load_error": "".join(traceback.format_exception_only(e)).strip()[-MAX_ERROR_CHARS:]})
        return
    tracer = Tracer()
    send({"loaded": True, "device": device})
    for case, expected in zip(request["cases"], request["expected"]):
        message = {"case": case["name"]}
        tracer.reset()
        try:
            result = tracer.call(function, make_inputs(case["args"], case["seed"], device))
            outputs = as_outputs(result)
            got = [(list(o.shape), str(o.dtype).removeprefix("torch.")) for o in outputs]
            want = [(e["shape"], e["dtype"]) for e in expected]
            if got != want:
                raise ValueError(f"returned (shape, dtype) {got}, expected {want}")
            message["outputs"] = [encode(o) for o in outputs]
        except BaseException as e:  # noqa: BLE001 - a failing case
            trace = traceback.format_exception(type(e), e, e.__traceback__.tb_next)
            message["error"] = "".join(trace)[-MAX_ERROR_CHARS:]
        send(
            {
                **message,
                "launches": tracer.launches,
                "torch_ops": sorted(set(tracer.torch_ops)),
                "host_reads": sorted(set(tracer.host_reads)),
                "tampered": tracer.tampered,
            }
        )
    send({"done": True})


if __name__ == "__main__":
    main()
