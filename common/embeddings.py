"""Embedding vectors as the APIs hand them out: L2-normalised, and packed for base64.

Torch-free: the engine returns the raw mean of the prompt's final hidden states
(executor.model_runner), and each front (``LLM.embed``, the gateway's HTTP and gRPC
routes) normalises it here, so that all three agree to the bit.
"""

from __future__ import annotations

import base64
import math
import struct
from array import array
from collections.abc import Sequence


def l2_normalize(vector: Sequence[float]) -> list[float]:
    """``vector / |vector|``, each value rounded to float32 (the vector's own precision,
    so that the float and base64 encodings carry the same numbers); a zero vector stays
    zero (it has no direction)."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if norm == 0.0:
        return list(vector)
    return array("f", [x / norm for x in vector]).tolist()


def to_base64(vector: Sequence[float]) -> str:
    """Little-endian float32, base64-encoded: OpenAI's ``encoding_format="base64"``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
