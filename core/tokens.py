"""The checksum that ties a trajectory's token ids to what the engine produced."""

from __future__ import annotations

import hashlib
import sys
from array import array


def token_checksum(prompt_ids: list[int], completion_ids: list[int]) -> str:
    """sha256 (hex) of the ids `prompt_ids + completion_ids` as little-endian int32: the rollout
    worker computes it when an episode ends, the learner again before training on it."""
    ids = array("i", [*prompt_ids, *completion_ids])  # a C int: 4 bytes on every platform we run
    if sys.byteorder != "little":
        ids.byteswap()
    return hashlib.sha256(ids.tobytes()).hexdigest()
