"""Versioned weight directories: what the file transport writes and reads.

`<root>/v000007/` holds version 7: a peft adapter directory (`adapter_model.safetensors` +
`adapter_config.json`, loadable as is by engines that only take adapters from disk) or, for full
weights, `model.safetensors`. The version and sha256 travel in the safetensors metadata, so a
reader checks the tensors against the checksum they were published with. A directory is written
under a staging name and renamed into place: a reader never sees a half-written version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter import AdapterWeights
from .full_weights import FullWeights

ADAPTER_FILE, ADAPTER_CONFIG, FULL_FILE = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
)


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def write_version(weights: AdapterWeights | FullWeights, root: str | Path, keep_last: int = 2) -> Path:
    """Write `weights` as `<root>/v<version>` atomically; keep only the newest `keep_last` versions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = version_dir(root, weights.version)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=root))
    try:
        if isinstance(weights, AdapterWeights):
            weights.save_pretrained(staging)  # metadata: policy_version, sha256
        else:
            save_file(
                weights.tensors,
                str(staging / FULL_FILE),
                metadata={"format": "pt", "policy_version": str(weights.version), "sha256": weights.sha256},
            )
        shutil.rmtree(target, ignore_errors=True)  # a re-publish of the same version (after a restart)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(root.glob("v[0-9]*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_version(directory: str | Path) -> AdapterWeights | FullWeights:
    """The weights in a version directory, with the version and checksum they were published
    with (not recomputed: the receiving engine verifies them)."""
    directory = Path(directory)
    adapter_file, full_file = directory / ADAPTER_FILE, directory / FULL_FILE
    path = adapter_file if adapter_file.is_file() else full_file
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: neither {ADAPTER_FILE} nor {FULL_FILE}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "policy_version" not in metadata or "sha256" not in metadata:
        raise ValueError(f"{path}: no policy_version/sha256 metadata; not written by the weight-sync channel")
    version, sha256, tensors = int(metadata["policy_version"]), metadata["sha256"], load_file(str(path))
    if path == full_file:
        return FullWeights(version=version, tensors=tensors, sha256=sha256)
    peft_config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return AdapterWeights(version=version, tensors=tensors, peft_config=peft_config, sha256=sha256)
