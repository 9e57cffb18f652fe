"""A torch.distributed broadcast group between the learner (rank 0) and the rollout workers.

This module is the wire format and one process's membership (`BroadcastMember`). The actors
hold theirs through the endpoint mixins (`weight_sync/endpoints.py`): the learner's
`open_sync_store`, `join_sync_group` and `broadcast_weights`, each worker's `join_sync_group`
and `receive_weights(FromBroadcast())`, which `BroadcastTransport` calls.

The group is its own process group (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPUs) over
a TCP store the learner hosts, independent of any default group the learner's DeepSpeed engine
uses. One sync is a fixed sequence of broadcasts from rank 0:

  1. the size of a JSON header (one int64),
  2. the header: version, sha256, kind, peft config, every tensor's (name, dtype, shape) and the
     buckets -- one dtype each, at most `bucket_bytes`, ordered by dtype then name,
  3. each bucket as one flat byte buffer.

Receivers allocate the bucket buffers once per layout and reuse them; the rebuilt weights are
views into those buffers, carrying the sha256 the learner published, which the engine checks
before loading (engines copy the tensors into their own weights, so the views may be reused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .adapter import AdapterWeights
from .full_weights import FullWeights, plan_buckets


@dataclass(frozen=True)
class GroupSpec:
    host: str  # where the learner's TCP store listens
    port: int
    world_size: int  # the learner + the workers
    backend: str  # "gloo" or "nccl"
    timeout_s: float
    name: str  # unique per formation: the store keys' prefix


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight-sync header")
    return dtype


class BroadcastMember:
    """This process's membership in one formation of the group (rank 0 = the learner)."""

    def __init__(self, spec: GroupSpec, rank: int, master_store: dist.TCPStore | None = None):
        timeout = timedelta(seconds=spec.timeout_s)
        self.rank, self.timeout = rank, timeout
        self.store = master_store or dist.TCPStore(
            spec.host, spec.port, spec.world_size, is_master=False, timeout=timeout
        )
        prefixed = dist.PrefixStore(f"{spec.name}/", self.store)
        if spec.backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"rank {rank}: the weight-sync group uses nccl but this process has no GPU"
                )
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size)
        elif spec.backend == "gloo":
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
        else:
            raise ValueError(f"weight-sync backend {spec.backend!r}: expected gloo or nccl")
        self._buffers: tuple[str, list[torch.Tensor]] | None = None  # (layout, bucket buffers)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank, options.timeout = 0, self.timeout
        self.group.broadcast([tensor], options).wait()

    def send(self, weights: AdapterWeights | FullWeights, bucket_bytes: int) -> None:
        """Rank 0: broadcast `weights` (every member must be in `receive` concurrently)."""
        tensors = weights.tensors
        buckets = plan_buckets([(n, t.dtype, t.nbytes) for n, t in tensors.items()], bucket_bytes)
        header = json.dumps(
            {
                "version": weights.version,
                "sha256": weights.sha256,
                "peft_config": getattr(weights, "peft_config", None),
                "layout": {
                    "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in sorted(tensors.items())},
                    "buckets": buckets,
                },
            }
        ).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        for bucket in buckets:
            flat = torch.cat([tensors[name].reshape(-1).view(torch.uint8) for name in bucket])
            self._broadcast(flat.to(self.device))

    def receive(self) -> AdapterWeights | FullWeights:
        """Ranks ≥ 1: the weights rank 0 sends, unverified (the engine verifies them)."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(size)
        blob = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(blob)
        header = json.loads(blob.cpu().numpy().tobytes())
        specs = {
            name: (_dtype(dtype), torch.Size(shape))
            for name, (dtype, shape) in header["layout"]["tensors"].items()
        }
        buckets = header["layout"]["buckets"]
        layout = json.dumps(header["layout"], sort_keys=True)
        if self._buffers is None or self._buffers[0] != layout:
            sizes = [sum(specs[n][1].numel() * specs[n][0].itemsize for n in bucket) for bucket in buckets]
            self._buffers = (layout, [torch.empty(s, dtype=torch.uint8, device=self.device) for s in sizes])
        tensors = {}
        for bucket, buffer in zip(buckets, self._buffers[1]):
            self._broadcast(buffer)
            flat, offset = buffer.cpu(), 0  # no copy on CPU
            for name in bucket:
                dtype, shape = specs[name]
                nbytes = shape.numel() * dtype.itemsize
                tensors[name] = flat[offset : offset + nbytes].view(dtype).view(shape)
                offset += nbytes
        if header["peft_config"] is None:
            return FullWeights(version=header["version"], tensors=tensors, sha256=header["sha256"])
        return AdapterWeights(
            version=header["version"],
            tensors=tensors,
            peft_config=header["peft_config"],
            sha256=header["sha256"],
        )
