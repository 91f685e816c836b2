"""The mean step: Caffe's mean image of the train split, as ``.binaryproto``, ``.npy`` and JSON.

The JSON (per-channel means, shape) also records the step's fingerprint, so a stale mean is
noticed like a stale database.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from datumdb.mean import binaryproto_bytes, compute_mean
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import input_digest, mean_record
from datumdb.pipeline.records import atomic_write
from datumdb.pipeline.summary import json_bytes

__all__ = ["mean_step"]


def mean_step(
    config: PipelineConfig,
    train_db: str | os.PathLike[str],
    *,
    binaryproto: str | os.PathLike[str],
    npy: str | os.PathLike[str],
    summary: str | os.PathLike[str],
) -> dict[str, Any]:
    """Compute the mean of ``train_db`` and write the three files; returns the JSON summary."""
    mean = compute_mean(train_db, progress=False)
    channel_means = [float(v) for v in mean.reshape(mean.shape[0], -1).astype(np.float64).mean(axis=1)]
    result = {
        "shape": list(mean.shape),
        "channel_means": channel_means,
        "pipeline": mean_record(config, input_digest(config)),
    }
    buffer = io.BytesIO()
    np.save(buffer, mean, allow_pickle=False)
    atomic_write(binaryproto, binaryproto_bytes(mean))
    atomic_write(npy, buffer.getvalue())
    atomic_write(summary, json_bytes(result))
    return result
