"""What the rollout benches share: their command line's model, engine and workload options."""

from __future__ import annotations

import argparse


def rollout_bench_parser(doc: str) -> argparse.ArgumentParser:
    """--model, --engine, --prompts, --samples, --repeats; a bench adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    return parser
