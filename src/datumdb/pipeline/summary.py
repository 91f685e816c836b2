"""The final report: one row per split, the train mean, the verdict; and the label histograms.

Pure functions of the verify reports and the mean, so both orchestrators write the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datumdb.errors import InputError

__all__ = ["histogram_csv", "json_bytes", "load_json", "report_step", "summary_markdown"]


def json_bytes(value: Any) -> bytes:
    """Pretty, key-sorted JSON: the same bytes for the same content."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def histogram_csv(histogram: dict[str, int]) -> bytes:
    """The label histogram as CSV (``label,count``), for DVC plots."""
    lines = ["label,count"] + [f"{label},{count}" for label, count in histogram.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def summary_markdown(
    verify_metrics: Sequence[dict[str, Any]], mean: dict[str, Any], fingerprint: str | None = None
) -> str:
    """The final human-readable report: one row per split, the train mean, and the verdict."""
    lines = [
        "# datumdb dataset report",
        "",
        "| split | records | shape | encoding | NCM accuracy | chance | verified | content digest |",
        "|---|---:|---|---|---:|---:|---|---|",
    ]
    for m in verify_metrics:
        lines.append(
            f"| {m['split']} | {m['count']} | {_shape(m)} | {m['encoding']} | "
            f"{m['ncm_accuracy']} | {m['chance_accuracy']} | {'yes' if m['ok'] else 'NO'} | `{m['digest']}` |"
        )
    if mean.get("skipped"):
        lines += ["", f"No train mean: {mean['skipped']}.", ""]
    else:
        channel_means = ", ".join(f"{v:.4f}" for v in mean.get("channel_means", []))
        lines += ["", f"Train mean per channel (stored order): {channel_means}", ""]
    left_out = [(m["split"], sample) for m in verify_metrics for sample in m.get("skipped") or []]
    if left_out:
        lines += [
            f"Skipped images ({len(left_out)}, `on_error: skip`):",
            "",
            "| split | path | list line | reason |",
            "|---|---|---:|---|",
        ]
        lines += [f"| {split} | {_cell(s['path'])} | {s['line']} | {_cell(s['reason'])} |" for split, s in left_out]
        lines.append("")
    if fingerprint:
        lines += [f"<!-- datumdb pipeline fingerprint: {fingerprint} -->", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: pipes and line breaks would end the cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _shape(metrics: dict[str, Any]) -> str:
    """One shape as CxHxW; varying sizes as how many there are."""
    if metrics.get("shape"):
        return "x".join(map(str, metrics["shape"]))
    return f"{len(metrics.get('shapes') or {})} sizes"


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON report file, with an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def report_step(
    details: Sequence[str | os.PathLike[str]], mean: str | os.PathLike[str], output: str | os.PathLike[str]
) -> tuple[str, bool]:
    """Write the summary of the verify reports and the mean; returns (text, all splits ok).

    The summary's fingerprint is made of the fingerprints those files record.
    """
    from datumdb.files import atomic_write, check_output_names
    from datumdb.pipeline.fingerprint import report_record

    check_output_names([output], [*details, mean])
    reports = [load_json(path) for path in details]
    mean_report = load_json(mean)
    record = report_record(
        {str(report.get("split")): _fingerprint(report, path) for report, path in zip(reports, details, strict=True)},
        _fingerprint(mean_report, mean),
    )
    text = summary_markdown(reports, mean_report, record["fingerprint"])
    atomic_write(output, text.encode("utf-8"))
    return text, all(r.get("ok") for r in reports)


def _fingerprint(report: dict[str, Any], path: str | os.PathLike[str]) -> str:
    pipeline = report.get("pipeline")
    value = pipeline.get("fingerprint") if isinstance(pipeline, dict) else None
    if not isinstance(value, str):
        raise InputError(f"{path}: records no pipeline fingerprint (not written by the datumdb pipeline)")
    return value
