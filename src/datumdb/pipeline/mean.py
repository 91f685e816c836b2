"""The mean step: Caffe's mean image of the train split, as ``.binaryproto``, ``.npy`` and JSON.

It reads the train shard set in its assembled order, so the mean is byte-identical to Caffe's
``compute_image_mean`` of the assembled database, whether or not that database is made.

The JSON (per-channel means, shape) also records the step's fingerprint, so a stale mean is
noticed like a stale database.

Caffe's ``compute_image_mean`` needs one image size (it aborts otherwise, and so does our
``compute-mean``, naming the record). A database of photos stored at their own sizes has no
mean image, and that is not a failed build: the step then writes an empty ``BlobProto`` (zero
bytes: a valid message with no data), an empty ``.npy`` and a JSON saying why, with the mean of
each channel over every pixel of a seeded sample of :data:`CHANNEL_MEAN_SAMPLE` train images
(what Caffe's ``transform_param { mean_value }`` takes instead of a ``mean_file``; decoding
every photo for three numbers would cost more than the build); the report carries both.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from datumdb.files import atomic_write, check_output_names
from datumdb.mean import channel_means, compute_mean, mean_files
from datumdb.pipeline.fingerprint import mean_record, recorded_build_fingerprint
from datumdb.pipeline.summary import json_bytes
from datumdb.reader import DatumReader

__all__ = ["CHANNEL_MEAN_SAMPLE", "mean_step"]

CHANNEL_MEAN_SAMPLE = 256  # images (a seeded sample of train) behind the channel means of mixed sizes


def mean_step(
    train_db: str | os.PathLike[str],
    *,
    binaryproto: str | os.PathLike[str],
    npy: str | os.PathLike[str],
    summary: str | os.PathLike[str],
    progress: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compute the mean of ``train_db`` and write the three files; returns the JSON summary."""
    check_output_names([binaryproto, npy, summary], [train_db])
    with DatumReader(train_db, imread="auto") as reader:  # a shard set's manifest: its shards' added up
        manifest = reader.manifest
        shapes = manifest.get("shapes") or {}
        if len(shapes) > 1:  # read by the reader open already: thousands of shards are opened once
            means, images = channel_means(reader, progress=progress, sample=CHANNEL_MEAN_SAMPLE, seed=seed)
    if len(shapes) > 1:
        distinct = (manifest.get("shape_summary") or {}).get("distinct", len(shapes))
        proto, npy_bytes = b"", _empty_npy()
        result: dict[str, Any] = {
            "skipped": f"the train images have {distinct} different sizes; a mean image needs one (as in Caffe)",
            "shape": None,
            "channel_means": means,  # over every pixel of the sampled images: Caffe's mean_value
            "channel_means_images": images,
        }
    else:
        proto, npy_bytes, result = mean_files(compute_mean(train_db, progress=progress))
    result["pipeline"] = mean_record(recorded_build_fingerprint(train_db))
    atomic_write(binaryproto, proto)
    atomic_write(npy, npy_bytes)
    atomic_write(summary, json_bytes(result))
    return result


def _empty_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0,), dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()
