"""The checksum of an episode's token ids (docs/agentic.md): the rollout worker computes it when an
episode ends, the learner recomputes it and refuses a sample whose ids changed on the way."""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence


def token_checksum(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """sha256 hex digest of `prompt_ids + completion_ids` as little-endian unsigned 32-bit integers,
    4 bytes an id, nothing between them (a fixed width: no separator or encoding to agree on; every
    vocabulary fits). Where the prompt ends is not hashed: the ids are what the model saw."""
    ids = [*prompt_ids, *completion_ids]
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
