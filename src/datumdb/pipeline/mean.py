"""The mean step: Caffe's mean image of the train split, as ``.binaryproto``, ``.npy`` and JSON.

The JSON (per-channel means, shape) also records the step's fingerprint, so a stale mean is
noticed like a stale database.
"""

from __future__ import annotations

import os
from typing import Any

from datumdb.files import atomic_write
from datumdb.mean import compute_mean, mean_files
from datumdb.pipeline.fingerprint import mean_record, recorded_build_fingerprint
from datumdb.pipeline.summary import json_bytes

__all__ = ["mean_step"]


def mean_step(
    train_db: str | os.PathLike[str],
    *,
    binaryproto: str | os.PathLike[str],
    npy: str | os.PathLike[str],
    summary: str | os.PathLike[str],
) -> dict[str, Any]:
    """Compute the mean of ``train_db`` and write the three files; returns the JSON summary."""
    mean = compute_mean(train_db, progress=False)
    proto, npy_bytes, result = mean_files(mean)
    result["pipeline"] = mean_record(recorded_build_fingerprint(train_db))
    atomic_write(binaryproto, proto)
    atomic_write(npy, npy_bytes)
    atomic_write(summary, json_bytes(result))
    return result
