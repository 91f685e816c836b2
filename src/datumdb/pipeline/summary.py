"""The final report: one row per split, the train mean, the verdict; and the label histograms.

Pure functions of the verify reports and the mean, so both orchestrators write the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datumdb.errors import InputError

__all__ = ["class_name", "histogram_csv", "json_bytes", "load_json", "report_step", "summary_markdown"]


def json_bytes(value: Any) -> bytes:
    """Pretty, key-sorted JSON: the same bytes for the same content."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def histogram_csv(histogram: dict[str, int], classes: Sequence[str] | None = None) -> bytes:
    """The label histogram as CSV (``label,count``; ``label,class,count`` when the classes have
    names, as for class folders), for DVC plots and people."""
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    if classes is None:
        out.writerow(["label", "count"])
        out.writerows([label, count] for label, count in histogram.items())
    else:
        out.writerow(["label", "class", "count"])
        out.writerows([label, class_name(label, classes), count] for label, count in histogram.items())
    return buffer.getvalue().encode("utf-8")


def class_name(label: str | int, classes: Sequence[str] | None) -> str:
    """The class name of a label ('' when unknown or out of range)."""
    index = int(label)
    return classes[index] if classes is not None and 0 <= index < len(classes) else ""


LABEL_ROWS = 50
"""The report lists every label up to this many; more (ImageNet's 1000) are summarised."""


def summary_markdown(
    verify_metrics: Sequence[dict[str, Any]], mean: dict[str, Any], fingerprint: str | None = None
) -> str:
    """The final human-readable report: one row per split, the sizes, the labels (with their
    class names), the train mean, and the verdict; readable at 10^5 images of their own sizes."""
    lines = [
        "# datumdb dataset report",
        "",
        "| split | records | shape | encoding | NCM accuracy | chance | verified | content digest |",
        "|---|---:|---|---|---:|---:|---|---|",
    ]
    for m in verify_metrics:
        lines.append(
            f"| {m['split']} | {m['count']} | {_shape(m)} | {_encoding(m)} | "
            f"{m['ncm_accuracy']} | {m['chance_accuracy']} | {'yes' if m['ok'] else 'NO'} | `{m['digest']}` |"
        )
    lines += _sizes(verify_metrics)
    lines += _labels(verify_metrics)
    channel_means = ", ".join(f"{v:.4f}" for v in mean.get("channel_means") or [])
    if mean.get("skipped"):
        lines += ["", f"No train mean image (mean.binaryproto is empty): {mean['skipped']}."]
        if channel_means:
            lines += [
                "",
                f"Train mean per channel over every pixel of every image (stored order, for Caffe's "
                f"`mean_value`): {channel_means}",
            ]
        lines.append("")
    else:
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


_ENCODING_NAMES = {"jpg": "JPEG", "png": "PNG", "none": "raw", "other": "other"}


def _encoding(metrics: dict[str, Any]) -> str:
    """The stored encoding; a mix as shares (``original file bytes: 90% JPEG, 10% PNG``)."""
    encodings = metrics.get("encodings")
    if not encodings:
        return str(metrics.get("encoding"))
    total = sum(encodings.values()) or 1
    ordered = sorted(encodings.items(), key=lambda item: (-item[1], item[0]))
    shares = ", ".join(f"{_percent(count, total)} {_ENCODING_NAMES.get(name, _cell(name))}" for name, count in ordered)
    return f"original file bytes: {shares}" if metrics.get("params_encoding") == "original" else f"mixed: {shares}"


def _percent(count: int, total: int) -> str:
    share = 100 * count / total
    return f"{share:.0f}%" if share >= 1 or share == 0 else "<1%"


def _sizes(verify_metrics: Sequence[dict[str, Any]]) -> list[str]:
    """A table of the image sizes of each split whose images have several."""
    rows = []
    for m in verify_metrics:
        s = m.get("shape_summary")
        if not s:
            continue
        spread = [
            f"{s[side]['min']} / {s[side]['median']} / {s[side]['max']}" if s.get(side) else ""
            for side in ("height", "width")
        ]
        bins = ", ".join(f"{name}: {count}" for name, count in s["longer_side"].items())
        common = ", ".join(f"{name} ({count})" for name, count in s["most_common"][:3])
        rows.append(f"| {m['split']} | {s['distinct']} | {spread[0]} | {spread[1]} | {bins} | {common} |")
    if not rows:
        return []
    return [
        "",
        "Image sizes (height and width: min / median / max; longer side in pixels: images):",
        "",
        "| split | distinct sizes | height | width | longer side | most common (CxHxW) |",
        "|---|---:|---|---|---|---|",
        *rows,
    ]


def _labels(verify_metrics: Sequence[dict[str, Any]]) -> list[str]:
    """Records per label and split, with the class names when known; many labels summarised."""
    classes = next((m["classes"] for m in verify_metrics if m.get("classes")), None)
    splits = [m["split"] for m in verify_metrics]
    counts: dict[int, dict[str, int]] = {}
    for m in verify_metrics:
        for label, count in (m.get("label_histogram") or {}).items():
            counts.setdefault(int(label), {})[m["split"]] = count
    if classes is None or not counts:  # numbered labels only: the histogram CSVs have them
        return []
    header = ["", f"Labels ({len(counts)}, class names from the class folders):", ""]
    if len(counts) <= LABEL_ROWS:
        return [
            *header,
            "| label | class | " + " | ".join(splits) + " |",
            "|---:|---|" + "---:|" * len(splits),
            *(
                f"| {label} | {_cell(class_name(label, classes))} | "
                + " | ".join(str(counts[label].get(split, 0)) for split in splits)
                + " |"
                for label in sorted(counts)
            ),
        ]
    rows = []
    for split in splits:
        present = sorted((c[split], label) for label, c in counts.items() if c.get(split))
        if not present:
            continue
        (low, low_label), (high, high_label) = present[0], present[-1]
        rows.append(
            f"| {split} | {len(present)} | {low} ({_cell(class_name(low_label, classes))}) | "
            f"{present[(len(present) - 1) // 2][0]} | {high} ({_cell(class_name(high_label, classes))}) |"
        )
    return [
        *header,
        "| split | labels | fewest records (class) | median | most records (class) |",
        "|---|---:|---|---:|---|",
        *rows,
        "",
        "Every label with its class name and count: the split's `*_labels.csv`.",
    ]


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: pipes and line breaks would end the cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _shape(metrics: dict[str, Any]) -> str:
    """One shape as CxHxW; varying sizes as how many there are."""
    if metrics.get("shape"):
        return "x".join(map(str, metrics["shape"]))
    summary = metrics.get("shape_summary")
    if summary:
        return f"{summary['distinct']} sizes"
    shapes = metrics.get("shapes") or {}
    return next(iter(shapes)) if len(shapes) == 1 else f"{len(shapes)} sizes"


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
