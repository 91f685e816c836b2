"""The ``datumdb`` command line: one subcommand per verb, ``main(argv) -> exit code``.

Exit codes (``main`` returns them; it never lets ``SystemExit`` or a traceback out):

* 0 success (also ``--help`` and ``--version``);
* 1 a database failed verification (``verify``, ``verify-split``, ``report``) and nothing else;
* 2 bad usage or bad input: exactly one line on stderr, ``datumdb <verb>: error: ...``, naming
  the option, file, line or key. Option values are checked when the command line is parsed
  (ranges below), so a bad value never reaches the library. Input errors are datumdb's own
  :class:`~datumdb.errors.DatumDBError`, an ``OSError``, a name that is not UTF-8, a damaged
  LMDB file (``<DB>: damaged or not an LMDB database: ...``) or input too large for memory.
  A usage error is the same one line, ending ``(see 'datumdb <verb> --help')``;
* 3 an internal error (a bug): one line
  ``datumdb <verb>: error: internal error, please report: <exception type>: <message>``;
  set ``DATUMDB_TRACEBACK=1`` to see the traceback instead;
* 130 interrupted (Ctrl-C or SIGTERM); the target holds the old or the new version, never a part.

Option ranges: ``--seed`` 0..2**32-1 (numpy's seeds); ``--resize-height``/``--resize-width``
0..65535 (:data:`MAX_RESIZE`) and at most :data:`MAX_RESIZE_PIXELS` pixels per image;
``--batch-size`` 1..2**31-1; ``--map-size`` 1..2**44 (the writer's largest map); ``--workers``
1..256; ``--records`` 0..2**31-1; ``--timeout`` a finite number of seconds in (0, 10**6].
Paths may not contain NUL bytes.

LMDB trusts ``data.mdb``: a damaged page can make it read past the end of the file or fail an
assertion, killing the process. So ``digest``, ``inspect``, ``export`` and ``compute-mean`` read
the database in a forked child, and a crash there is exit 2, ``<DB>: damaged or not an LMDB
database: reading it crashed LMDB (SIGBUS...)``; ``verify`` runs its scan in a child process of
its own, with a time limit. (A hang in the child is not limited: only ``verify`` has a timeout.)
The command line runs single-threaded; a program that calls ``main`` from a threaded process
should know these verbs fork.

Progress bars go to stderr and only on a terminal (``--progress``/``--no-progress`` to force);
without a bar (stderr a log file, or ``--no-progress``), a progress line every 10 s (:mod:`datumdb._progress`);
results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import math
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datumdb import __version__
from datumdb._progress import bars as progress_bars
from datumdb.errors import DatumDBError, DatumError, InputError, OutputTooLargeError
from datumdb.limits import (
    DEFAULT_DECODE_TIMEOUT,
    DEFAULT_MAX_EXPORT_BYTES,
    INT31_MAX,
    MAX_MAP_SIZE,
    MAX_RESIZE,
    MAX_RESIZE_PIXELS,
    MAX_TIMEOUT,
    SEED_MAX,
)
from datumdb.pipeline.splits import SPLITS
from datumdb.writer import DEFAULT_BATCH_SIZE, DEFAULT_MAP_SIZE, clear_interrupt, note_interrupt

__all__ = ["EXIT_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "MAX_RESIZE", "MAX_RESIZE_PIXELS", "main"]

EXIT_OK = 0
EXIT_FAILED = 1  # a database failed verification
EXIT_USAGE = 2  # bad usage or bad input
EXIT_INTERNAL = 3  # a bug in datumdb
EXIT_INTERRUPTED = 130

MAX_WORKERS = 256


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace DB if it already holds a database")
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="records per LMDB write transaction (default %(default)s, as Caffe); part of "
        "what determines the bytes of data.mdb",
    )
    parser.add_argument(
        "--map-size",
        type=_map_size,
        default=DEFAULT_MAP_SIZE,
        metavar="BYTES",
        help="initial LMDB map size; it doubles as needed (default %(default)s)",
    )


def _int_in(low: int, high: int) -> Any:
    """An argparse type: a decimal integer in [low, high], else a usage error naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:  # also a number too long to convert (over 4300 digits)
            raise argparse.ArgumentTypeError(f"expected an integer, got {_shown(text)}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {_shown(text)}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {_shown(text)}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


_positive = _int_in(1, INT31_MAX)
_non_negative = _int_in(0, INT31_MAX)
_seed = _int_in(0, SEED_MAX)
_resize = _int_in(0, MAX_RESIZE)
_map_size = _int_in(1, MAX_MAP_SIZE)
_workers = _int_in(1, MAX_WORKERS)


def _seconds(text: str) -> float:
    """A finite time limit in (0, MAX_TIMEOUT] seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {_shown(text)}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {_shown(text)}")
    return value


def _path(text: str) -> Path:
    """A file or folder name; NUL bytes cannot be in one (names that are not UTF-8 are fine)."""
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a path cannot contain a NUL byte: {_shown(text)}")
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


def _shown(text: str, limit: int = 60) -> str:
    """A user-given value quoted for a one-line message: escaped, and shortened if long."""
    shown = repr(text if len(text) <= limit else text[:limit] + "...")
    return _printable(shown)


def _printable(text: str) -> str:
    """``text`` as one line that any UTF-8 stream can print.

    Undecodable bytes of file names (surrogate escapes) are shown as ``\\xNN``, line breaks as
    ``\\n``, so that an error is always exactly one line.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line: ``datumdb <verb>: error: ... (see --help)``."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_printable(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="datumdb", description="Reproducible, Caffe-exact LMDB datasets of Datum records.")
    parser.add_argument("--version", action="version", version=f"datumdb {__version__}")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show progress bars (default: only on a terminal)",
    )
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="never show progress bars (a log still gets a progress line every 10 s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "convert-imageset",
        help="images + list file -> LMDB, exactly as Caffe's convert_imageset",
        description="Caffe convert_imageset semantics: each list line is '<path> <label>', split at "
        "its last space; keys are %%08d_<path>; images are BGR; resize (bilinear) only "
        "when both sizes are given. Unlike Caffe, --shuffle is seeded (--seed, default "
        "0) so the result is reproducible, and unreadable images are errors.",
    )
    p.add_argument("root", type=_path, metavar="ROOT/", help="folder the list's paths are relative to")
    p.add_argument("list_file", type=_path, metavar="LISTFILE", help="text file of '<path> <label>' lines")
    p.add_argument("db", type=_path, nargs="?", metavar="DB", help="database folder to create")
    p.add_argument(
        "--folders",
        action="store_true",
        help="no LISTFILE (give ROOT/ DB): images are ROOT/<class>/<image>, classes sorted by name are "
        "labels 0..n-1 (torchvision's ImageFolder); the manifest names the classes",
    )
    p.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="an image that cannot be read, decoded or encoded in time: stop with its list line (default), or "
        "skip it as Caffe does, listing it in the manifest",
    )
    p.add_argument(
        "--decode-timeout",
        type=_seconds,
        default=DEFAULT_DECODE_TIMEOUT,
        metavar="SECONDS",
        help="longest one image may take to decode (default %(default)g): a broken file cannot hang the build",
    )
    p.add_argument("--gray", action="store_true", help="load images as grayscale (1 channel)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the list (seeded) before writing")
    p.add_argument("--seed", type=_seed, default=0, help=f"seed of --shuffle, 0..{SEED_MAX} (default %(default)s)")
    p.add_argument("--resize-height", type=_resize, default=0, metavar="H", help=f"0 (no resize) .. {MAX_RESIZE}")
    p.add_argument("--resize-width", type=_resize, default=0, metavar="W", help=f"0 (no resize) .. {MAX_RESIZE}")
    p.add_argument("--check-size", action="store_true", help="fail unless all images have the same size")
    p.add_argument("--encoded", action="store_true", help="store encoded images (original bytes where possible)")
    p.add_argument(
        "--encode-type",
        choices=("png", "jpg"),
        default="",
        help="re-encode to this type (implies --encoded, as in Caffe)",
    )
    p.add_argument(
        "--allow-outside-root", action="store_true", help="accept absolute paths and paths with '..' in the list file"
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="image decoding processes (default: every usable core; with a --decode-timeout, even 1 is a child "
        "process, so the bound holds); the database is the same for any N",
    )
    _add_build_options(p)
    p.set_defaults(func=_convert_imageset)

    p = commands.add_parser(
        "convert-arrays",
        help="images .npy + labels .npy -> LMDB, streaming",
        description="Stream an images .npy ((N,H,W), (N,C,H,W) or (N,H,W,C)) and a 1-D integer "
        "labels .npy into a database. Memory stays bounded whatever the file size. "
        "uint8 images become raw Datums; other types float_data.",
    )
    p.add_argument("images", type=_path, metavar="IMAGES.npy")
    p.add_argument("labels", type=_path, metavar="LABELS.npy")
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument(
        "--layout",
        choices=("chw", "hwc"),
        default=None,
        help="axis order of 4-D images (default chw, but an array whose last axis looks like channels "
        "(1, 3 or 4) while axis 1 does not is refused until a layout is given)",
    )
    p.add_argument("--bgr-from-rgb", action="store_true", help="images are RGB: store them BGR as Caffe expects")
    p.add_argument(
        "--encode",
        choices=("none", "png", "jpg"),
        default="none",
        help="store raw Datums or PNG/JPEG-encoded ones (default %(default)s)",
    )
    _add_build_options(p)
    p.set_defaults(func=_convert_arrays)

    p = commands.add_parser(
        "compute-mean",
        help="mean image, exactly as Caffe's compute_image_mean",
        description="Float32 running sum in key order, divided by the count; encoded Datums are "
        "decoded. Writes a Caffe BlobProto; prints per-channel means.",
    )
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("output", type=_path, metavar="OUT.binaryproto")
    p.add_argument("--npy", type=_path, metavar="OUT.npy", help="also write the mean as a float32 (C,H,W) .npy")
    p.add_argument("--json", type=_path, metavar="OUT.json", help="also write per-channel means as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.set_defaults(func=_compute_mean, isolate=True)

    p = commands.add_parser(
        "verify",
        help="decode every record and check the content digest and manifest",
        description="Exit 0 only if every record decodes and count, digest, label histogram and "
        "shapes match datumdb.json. DB may be a shard set (a folder with shards.json): every shard "
        "is verified, and its count and digest checked against the index.",
    )
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="scan in this process (default: a child process, so a corrupt B-tree that crashes or "
        "hangs LMDB is reported instead of killing or hanging the command)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stall limit of the isolated scan: fail if it makes no progress, or one record takes to decode, "
        "this long (default 60; a slow but healthy database always passes)",
    )
    p.add_argument("--strict", action="store_true", help="fail a database without datumdb.json")
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="accept NaN and infinity in float_data (default: a failure)"
    )
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        metavar="PARAMS.yaml",
        help="also check that a pipeline-built database matches these params and input files (its "
        "manifest records the fingerprint of what made it); fails naming what differs",
    )
    p.set_defaults(func=_verify)

    p = commands.add_parser("digest", help="print the content digest (sha256 over keys and values in order)")
    p.add_argument("db", type=_path, metavar="DB")
    p.set_defaults(func=_digest, isolate=True)

    p = commands.add_parser("inspect", help="summarise a database and show its first records")
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument(
        "--records", type=_non_negative, default=5, metavar="N", help="records to list (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_inspect, isolate=True)

    p = commands.add_parser(
        "export",
        help="write all records to a .npz (images, labels, keys)",
        description="All records must decode to one shape; the whole dataset is held in memory, so "
        "an export over --max-bytes of decoded pixels is refused before anything is written. The "
        ".npz appears whole or not at all (written under a temporary name, then renamed).",
    )
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("output", type=_path, metavar="OUT.npz")
    p.add_argument(
        "--max-bytes",
        type=_non_negative,
        default=DEFAULT_MAX_EXPORT_BYTES,
        metavar="BYTES",
        help="refuse to export more decoded pixel bytes than this (default %(default)s = 4 GiB; 0: no bound)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT.npz if it already exists")
    p.set_defaults(func=_export, isolate=True)
    p = commands.add_parser(
        "assemble",
        help="a shard set -> one Caffe database of all its records, in its seeded shuffled order",
        description="Copies every record of the shard set SHARDS/ (a folder with shards.json) into one "
        "LMDB, as stored (nothing is decoded), keyed by its rank in the order of its seeded hash "
        "(%%08d_<path> for image files), so Caffe's Data layer reads a shuffled set.",
    )
    p.add_argument("shards", type=_path, metavar="SHARDS/")
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("--overwrite", action="store_true", help="replace DB if it already holds a database")
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="records per LMDB write transaction (default %(default)s); the map is sized from the shards",
    )
    p.set_defaults(func=_assemble)
    _add_pipeline_commands(commands)
    return parser


def _add_jobs_option(p: argparse.ArgumentParser, when: str) -> None:
    """``--jobs``: the processes a DVC stage spreads its parts or splits over (pipeline/processes.py)."""
    p.add_argument("--jobs", type=_positive, default=None, help=f"processes, {when} (default: the usable cores)")


def _add_pipeline_commands(commands: Any) -> None:
    """``datumdb pipeline STEP``: the workflow's steps, run by the Snakefile's rules and DVC's stages.

    Each step reads its values from the params file (``--params``, default params.yaml), so no
    value is ever joined into a shell command; output paths are arguments.
    """
    group = commands.add_parser(
        "pipeline",
        help="the workflow's steps (Snakemake rules and DVC stages call these)",
        description="Steps of the datumdb pipeline over one params file. See README, 'Pipeline'.",
    )
    steps = group.add_subparsers(dest="step", required=True, metavar="STEP")

    def step(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = steps.add_parser(name, help=help, description=help)
        p.add_argument("--params", type=_path, default=Path("params.yaml"), metavar="PARAMS.yaml")
        p.set_defaults(func=func)
        return p

    p = step("check", _pipeline_check, "check the params file (schema; YAML 1.1 = 1.2) and print it resolved as JSON")
    p.add_argument(
        "--output", type=_path, metavar="OUT.json", help="write it there, with the input files' digest (DVC's params)"
    )
    p = step("stale", _pipeline_stale, "list missing outputs and those whose fingerprint does not match the params")
    p.add_argument("--root", type=_path, default=Path("."), help="folder the outputs are under")
    p = step("shards", _pipeline_shards, "build the planned shards that are missing or stale, and index each split")
    p.add_argument("shards", type=_path, metavar="SHARDS/", help="the shard sets go to SHARDS/<split>")
    p.add_argument(
        "--part",
        type=_path,
        metavar="PART.json",
        help="build only this part plan's shards (a Snakemake job; each split is indexed by `pipeline index`)",
    )
    _add_jobs_option(p, "without --part")
    p = step("index", _pipeline_index, "index a split's shard set as its plan says (once its parts are built)")
    p.add_argument("--split", choices=SPLITS, required=True)
    p.add_argument("--split-plan", type=_path, required=True, metavar="SPLIT.json", help="the split's plan file")
    p.add_argument("shard_set", type=_path, metavar="SHARDS/SPLIT")
    p = step("assemble", _pipeline_assemble, "derive each split's one Caffe database from its (indexed) shard set")
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="this split only (a Snakemake job): SHARDS and DB are its shard set and database; "
        "without it, every split, SHARDS/<split> into DB/<split>, in parallel processes",
    )
    p.add_argument("shard_set", type=_path, metavar="SHARDS")
    p.add_argument("db", type=_path, metavar="DB")
    _add_jobs_option(p, "without --split")
    p = step("verify", _pipeline_verify, "verify each split against its source; write its reports (exit 1 on mismatch)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="this split only (a Snakemake job; DB is its shard set, the reports go where the options say); "
        "without it, every split of the folder DB in parallel processes, the reports where dvc.yaml lists them",
    )
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("--train-db", type=_path, metavar="DB", help="the train split (class means); with --split")
    p.add_argument("--details", type=_path, metavar="OUT.json", help="the full report; with --split")
    p.add_argument("--metrics", type=_path, metavar="OUT.json", help="a few numbers (DVC metrics); with --split")
    p.add_argument("--histogram", type=_path, metavar="OUT.csv", help="label histogram (DVC plots); with --split")
    p.add_argument("--sheet", type=_path, metavar="OUT.png", help="contact sheet; with --split")
    _add_jobs_option(p, "without --split")
    p.add_argument(
        "--plan",
        type=_path,
        metavar="PLAN/",
        help="the plan files made for this run (Snakemake's); default: plan again from the params and inputs",
    )
    p = step("mean", _pipeline_mean, "the train split's mean image (Caffe BlobProto, .npy, per-channel JSON)")
    p.add_argument("db", type=_path, metavar="DB")
    p.add_argument("--binaryproto", type=_path, required=True, metavar="OUT.binaryproto")
    p.add_argument("--npy", type=_path, required=True, metavar="OUT.npy")
    p.add_argument("--json", type=_path, required=True, metavar="OUT.json")
    p = step("report", _pipeline_report, "summarise the verify reports and the mean as Markdown")
    p.add_argument("details", type=_path, nargs="+", metavar="VERIFY.json")
    p.add_argument("--mean", type=_path, required=True, metavar="MEAN.json")
    p.add_argument("--output", type=_path, required=True, metavar="OUT.md")


def main(argv: Sequence[str | bytes] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring), never raises.

    Arguments may be bytes (file names that are not UTF-8): they are decoded as Python decodes
    ``sys.argv`` (``os.fsdecode``), so they name the same files.
    """
    parser = build_parser()
    if argv is not None:
        argv = [os.fsdecode(arg) if isinstance(arg, bytes) else arg for arg in argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = f"datumdb {args.command}"
    _quiet_opencv()
    problem = _check_combination(args)
    if problem:
        print(f"{command}: error: {problem} (see '{command} --help')", file=sys.stderr)
        return EXIT_USAGE
    # Schedulers (Snakemake, SLURM, DVC) stop jobs with SIGTERM; turning it into
    # KeyboardInterrupt unwinds the writer's `with` block, which removes its build folder.
    in_main_thread = threading.current_thread() is threading.main_thread()
    clear_interrupt()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    previous_int = signal.signal(signal.SIGINT, _interrupt) if in_main_thread else None
    try:
        with progress_bars(args.progress):  # --no-progress: no bars; a log still gets progress lines
            if getattr(args, "isolate", False) and hasattr(os, "fork"):
                return _run_in_child(args)
            return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def _run(args: argparse.Namespace) -> int:
    """Run the command; bad input becomes one line and exit 2, a bug one line and exit 3."""
    command = f"datumdb {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            f"{command}: interrupted (a database is only ever published whole)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = _input_problem(exc, args)
        if message is None:
            if os.environ.get("DATUMDB_TRACEBACK"):
                raise
            message = f"internal error, please report: {type(exc).__name__}: {exc}"
            code = EXIT_INTERNAL
        else:
            code = EXIT_USAGE
        print(f"{command}: error: {_printable(message)}", file=sys.stderr)
        return code


def _run_in_child(args: argparse.Namespace) -> int:
    """Run a command that reads a database in a forked child, and report the child's death.

    LMDB trusts ``data.mdb``: a damaged page can make it read past the end of the file or fail
    one of its assertions, which kills the process (SIGBUS, SIGSEGV, SIGABRT) instead of
    raising. In a child, that becomes exit 2 naming the database (and LMDB's own last words,
    which the child's file descriptor 2 collects instead of the terminal). Python's output is
    unchanged: printed directly when stdout and stderr are real files (progress bars stay live),
    otherwise (``main`` called with redirected streams) sent back through a pipe.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    direct = _is_real_file(sys.stdout) and _is_real_file(sys.stderr)
    # Closed by `with crash_log` below (the child leaves by os._exit).
    crash_log = tempfile.TemporaryFile()  # noqa: SIM115
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns when other threads exist (tqdm's monitor)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        try:
            os.close(read_end)
            err: Any = io.StringIO()
            if direct:
                err = open(os.dup(2), "w", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
            os.dup2(crash_log.fileno(), 2)  # what C code writes to fd 2 (LMDB's assertions)
            faulthandler.disable()  # a crash here is reported by the parent, not dumped
            with contextlib.suppress(ValueError):  # the parent alone reports an interruption
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            out: Any = sys.stdout if direct else io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = _run(args)
            out.flush()
            err.flush()
            captured = ["", ""] if direct else [out.getvalue(), err.getvalue()]
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps([code, *captured]).encode("ascii"))
        finally:
            os._exit(0)
    os.close(write_end)
    with crash_log:
        try:
            with os.fdopen(read_end, "rb") as pipe:
                payload = pipe.read()
            _, status = os.waitpid(pid, 0)
        except KeyboardInterrupt:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            print(
                f"datumdb {args.command}: interrupted (a database is only ever published whole)",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        crash_log.seek(0)
        last_words = crash_log.read(1 << 16).decode("utf-8", "replace").strip().splitlines()
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        detail = f": {last_words[-1]}" if last_words else ""
        message = f"{args.db}: damaged or not an LMDB database: reading it crashed LMDB ({name}{detail})"
        print(f"datumdb {args.command}: error: {_printable(message)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code, out_text, err_text = json.loads(payload)
    except ValueError:
        print(f"datumdb {args.command}: error: internal error, please report: the worker process died", file=sys.stderr)
        return EXIT_INTERNAL
    sys.stdout.write(out_text)
    sys.stderr.write(err_text)
    return int(code)


def _is_real_file(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def _quiet_opencv() -> None:
    """OpenCV prints its own warnings about damaged images ("[ WARN:0] ... PNG input buffer is
    incomplete") to stderr; datumdb reports the image as an error in one line instead."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _check_combination(args: argparse.Namespace) -> str | None:
    """Limits that involve several options (each option's own range is checked by its type)."""
    if args.command == "convert-imageset" and args.resize_height > 0 and args.resize_width > 0:
        pixels = args.resize_height * args.resize_width
        if pixels > MAX_RESIZE_PIXELS:
            return (
                f"argument --resize-height/--resize-width: {args.resize_height} x {args.resize_width} is {pixels} "
                f"pixels per image; the limit is {MAX_RESIZE_PIXELS}"
            )
    return None


def _input_problem(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one-line message of an exception caused by bad input, or None for a bug.

    datumdb raises its own errors where it reads input; this is the boundary for what the
    libraries underneath raise about the user's files: the OS (missing file, no permission,
    disk full), names that are not UTF-8, LMDB on a damaged file, and input too big to load.
    """
    import lmdb

    db = getattr(args, "db", None)
    if isinstance(exc, DatumError) and db is not None and str(db) not in str(exc):
        return f"{db}: {exc}"  # a record that does not parse names its key; say which database
    if isinstance(exc, DatumDBError):
        return str(exc)
    if isinstance(exc, OSError):  # disk full, permission denied...: the message names the file
        return str(exc)
    if isinstance(exc, lmdb.Error):  # py-lmdb's own errors are not OSErrors
        return f"{db}: damaged or not an LMDB database: {exc}"
    if isinstance(exc, UnicodeError):  # a file name or text that is not UTF-8
        return f"a file name or text is not valid UTF-8: {exc}"
    if isinstance(exc, MemoryError):
        return f"out of memory (is an input, or an option such as a resize, too large?) {exc}".rstrip()
    if isinstance(exc, RecursionError):
        return f"input nested too deeply: {exc}"
    return None


def _interrupt(signum: int, frame: object) -> None:
    note_interrupt()  # in case the KeyboardInterrupt is lost on its way up (see note_interrupt)
    raise KeyboardInterrupt


# ------------------------------------------------------------------------ commands


def _convert_imageset(args: argparse.Namespace) -> int:
    from datumdb.decodepool import tune_malloc
    from datumdb.imageset import ImagesetOptions, convert_imageset
    from datumdb.manifest import read_manifest

    tune_malloc()  # this process holds photo-sized records too

    options = ImagesetOptions(
        gray=args.gray,
        shuffle=args.shuffle,
        seed=args.seed,
        resize_height=args.resize_height,
        resize_width=args.resize_width,
        check_size=args.check_size,
        encoded=args.encoded,
        encode_type=args.encode_type,
        allow_outside_root=args.allow_outside_root,
    )
    list_file, db = (None, args.list_file) if args.folders else (args.list_file, args.db)
    if args.folders and args.db is not None:
        raise InputError("convert-imageset --folders takes ROOT/ DB: the labels come from the folders, not a LISTFILE")
    if db is None:
        raise InputError("convert-imageset: missing DB (give ROOT/ LISTFILE DB, or --folders ROOT/ DB)")
    convert_imageset(
        args.root,
        list_file,
        db,
        options,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=args.progress,
        map_size=args.map_size,
        on_error=args.on_error,
        decode_timeout=args.decode_timeout,
    )
    skipped = read_manifest(db)["metadata"].get("skipped")
    if skipped:
        print(_printable(f"datumdb convert-imageset: skipped {len(skipped)} images (listed in {db}/datumdb.json)"),
              file=sys.stderr)  # fmt: skip
    return _report_built(db)


def _convert_arrays(args: argparse.Namespace) -> int:
    from datumdb.sources import convert_arrays

    convert_arrays(
        args.images,
        args.labels,
        args.db,
        layout=args.layout,
        bgr_from_rgb=args.bgr_from_rgb,
        encoding=args.encode,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        map_size=args.map_size,
        progress=args.progress,
    )
    return _report_built(args.db)


def _report_built(db: Path) -> int:
    from datumdb.manifest import read_manifest

    manifest = read_manifest(db)
    print(_printable(f"{db}: {manifest['count']} records, {manifest['digest']}"))
    return 0


def _compute_mean(args: argparse.Namespace) -> int:
    from datumdb.files import atomic_write, check_new_outputs
    from datumdb.mean import compute_mean, mean_files

    outputs = (args.output, args.npy, args.json)
    check_new_outputs(outputs, overwrite=args.overwrite, inputs=[args.db])
    proto, npy_bytes, summary = mean_files(compute_mean(args.db, progress=args.progress))
    for path, data in zip(outputs, (proto, npy_bytes, (json.dumps(summary, indent=2) + "\n").encode()), strict=True):
        if path is not None:  # each written whole, under a temporary name first
            atomic_write(path, data)
    for channel, value in enumerate(summary["channel_means"]):
        print(f"mean_value channel [{channel}]: {value:.6f}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from datumdb.shardset import is_shard_set
    from datumdb.verify import verify_database, verify_shard_set

    check = verify_shard_set if is_shard_set(args.db) else verify_database
    report = check(
        args.db,
        progress=args.progress,
        isolate=not args.in_process,
        timeout=args.timeout,
        strict=args.strict,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.params is not None:
        from datumdb.pipeline.outputs import database_matches_params

        problems = database_matches_params(args.db, args.params)
        report["problems"] = [*report["problems"], *problems]
        report["ok"] = report["ok"] and not problems
    if args.json:
        print(json.dumps(report, indent=2))
    elif report["ok"]:
        for warning in report["warnings"]:
            print(_printable(f"datumdb verify: warning: {warning}"), file=sys.stderr)
        print(_printable(f"{args.db}: OK, {report['count']} records, {report['digest']}"))
    else:
        for problem in report["problems"]:
            print(_printable(f"datumdb verify: {problem}"), file=sys.stderr)
        counts = f"{len(report['problems'])} problem(s)"
        if report["bad_records"] is not None:  # None: the scan did not get as far as the records
            counts += f", {report['bad_records']} bad record(s)"
        print(_printable(f"{args.db}: FAILED ({counts})"), file=sys.stderr)
    return 0 if report["ok"] else 1


def _assemble(args: argparse.Namespace) -> int:
    from datumdb.shardset import assemble

    manifest = assemble(args.shards, args.db, overwrite=args.overwrite, batch_size=args.batch_size)
    print(f"{args.db}: {manifest['count']} records, digest {manifest['digest']}")
    return 0


def _digest(args: argparse.Namespace) -> int:
    from datumdb.verify import content_digest

    print(content_digest(args.db, progress=args.progress))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from datumdb.codec import decode
    from datumdb.manifest import describe_labels, describe_shapes, read_manifest
    from datumdb.reader import DatumReader

    with DatumReader(args.db) as reader:
        manifest: dict[str, Any] | None = None
        manifest_problem = None
        try:
            manifest = read_manifest(args.db)
        except DatumDBError as exc:
            manifest_problem = str(exc)
        records = []
        for index, (key, value) in enumerate(reader.items()):
            if index >= args.records:
                break
            datum = decode(value, key)
            records.append(
                {
                    "key": key.decode("utf-8", "backslashreplace"),
                    "bytes": len(value),
                    "channels": datum.channels,
                    "height": datum.height,
                    "width": datum.width,
                    "label": datum.label,
                    "encoded": datum.encoded,
                    "data_bytes": len(datum.data),
                    "float_data": int(datum.float_data.size),
                }
            )
        summary = {
            "path": str(args.db),
            "count": len(reader),
            "manifest": manifest,
            "manifest_problem": manifest_problem,
            "records": records,
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(_printable(f"{args.db}: {summary['count']} records"))
    if manifest is not None:
        print(_printable(f"  digest: {manifest.get('digest')}"))
        print(_printable(f"  shapes: {describe_shapes(manifest.get('shapes') or {}, manifest.get('shape_summary'))}"))
        for field in ("dtype", "encoding", "encodings", "channel_order"):
            if field in manifest:
                print(_printable(f"  {field}: {manifest[field]}"))
        classes = (manifest.get("metadata") or {}).get("classes")
        labels = describe_labels(manifest.get("label_histogram") or {}, classes if isinstance(classes, list) else None)
        print(_printable(f"  label_histogram: {labels}"))
    elif manifest_problem and "no manifest" not in manifest_problem:
        print(_printable(f"  manifest damaged: {manifest_problem}"))
    else:
        print("  no datumdb.json manifest (not written by datumdb)")
    for record in records:
        print(_printable("  " + "  ".join(f"{k}={v}" for k, v in record.items())))
    return 0


def _export(args: argparse.Namespace) -> int:
    """Decode every record into one array and write it, bounded and atomically.

    The size is known before anything big is allocated: the first record's decoded size times
    the count (every record must have its shape). Over ``--max-bytes`` (default 4 GiB) the
    export is refused, so a database of decompression bombs (tiny PNGs declaring 100 megapixels
    each) cannot fill memory and disk. The .npz is written to a hidden temporary name in the
    target folder and renamed over ``OUT`` only when complete (:func:`datumdb.files.replacing`).
    """
    from datumdb.errors import DatabaseError
    from datumdb.files import check_new_outputs, replacing
    from datumdb.reader import DatumReader

    output: Path = args.output
    if not output.name.endswith(".npz"):  # what np.savez(path) would have written
        output = output.with_name(output.name + ".npz")
    check_new_outputs([output], overwrite=args.overwrite, inputs=[args.db])
    with DatumReader(args.db) as reader:
        count = len(reader)
        if count == 0:
            raise DatumDBError(f"{args.db}: the database is empty; nothing to export")
        first, _ = reader[0]
        total = count * first.nbytes
        if args.max_bytes and total > args.max_bytes:
            raise OutputTooLargeError(
                f"{args.db}: exporting {count} records of {first.dtype} {tuple(first.shape)} needs {total} bytes "
                f"of decoded pixels, over --max-bytes {args.max_bytes}; raise it (0 for no bound) to export anyway"
            )
        images = np.empty((count, *first.shape), dtype=first.dtype)
        del first
        try:
            images, labels = reader.read_batch(np.arange(count), out=images)
        except KeyError as exc:  # the cursor listed a key that a lookup cannot find: a damaged B-tree
            raise DatabaseError(f"{args.db}: damaged: {exc.args[0] if exc.args else exc}") from None
        keys = np.array(reader.keys())
    with replacing(output, durable=True) as handle:
        np.savez(handle, images=images, labels=labels, keys=keys)
    print(_printable(f"{output}: images {images.dtype} {images.shape}, {count} labels"))
    return 0


# ------------------------------------------------------------------------ pipeline steps


def _config(args: argparse.Namespace) -> Any:
    from datumdb.pipeline.config import load_config

    return load_config(args.params)


def _pipeline_check(args: argparse.Namespace) -> int:
    from datumdb.files import atomic_write
    from datumdb.pipeline.config import resolved_json
    from datumdb.pipeline.fingerprint import input_digest, stage_params_json
    from datumdb.pipeline.plan import load_hash_cache, save_hash_cache

    config = _config(args)
    if args.output is None:
        print(resolved_json(config).decode("utf-8"), end="")
    else:
        cache = load_hash_cache()  # shared with the other steps: each input file hashed once
        atomic_write(args.output, stage_params_json(config, input_digest(config, cache)))
        save_hash_cache(cache)
    return 0


def _pipeline_stale(args: argparse.Namespace) -> int:
    from datumdb.pipeline.outputs import missing_outputs, stale_outputs

    stale = stale_outputs(_config(args), args.root)
    missing = missing_outputs(args.root)
    for path in missing:
        print(f"{path}: missing")
    for path, reasons in stale.items():
        print(f"{path}: stale: {'; '.join(reasons)}")
    if not stale and not missing:
        print("every output exists and matches the params")
    return 1 if stale or missing else 0


def _pipeline_shards(args: argparse.Namespace) -> int:
    from datumdb.decodepool import tune_malloc
    from datumdb.pipeline.plan import read_part
    from datumdb.pipeline.shards import build_part, build_shard_sets

    tune_malloc()  # shards of photos: see tune_malloc
    config = _config(args)
    if args.part is not None:
        tasks = read_part(args.part)
        built = build_part(config, tasks, args.shards, workers=args.jobs or 1)
        print(f"{args.part}: {len(built)} of {len(tasks)} shards built, the others current")
        return 0
    for split, index in build_shard_sets(config, args.shards, jobs=args.jobs).items():
        print(f"{args.shards / split}: {index['count']} records in {len(index['shards'])} shards")
    return 0


def _pipeline_index(args: argparse.Namespace) -> int:
    from datumdb.pipeline.plan import read_split_plan
    from datumdb.pipeline.shards import finish_split

    config = _config(args)
    plan = read_split_plan(args.split_plan)
    if plan.get("split") != args.split:
        raise InputError(f"{args.split_plan}: the plan of split {plan.get('split')!r}, not {args.split!r}")
    index = finish_split(plan, args.shard_set, config.seed)
    print(f"{args.shard_set}: {index['count']} records in {len(index['shards'])} shards")
    return 0


def _pipeline_assemble(args: argparse.Namespace) -> int:
    from datumdb.decodepool import tune_malloc
    from datumdb.pipeline.assemble import assemble_splits, assemble_step

    tune_malloc()
    config = _config(args)
    if args.split is None:
        assemble_splits(config, args.shard_set, args.db, jobs=args.jobs)
        databases = [args.db / split for split in SPLITS]
    else:
        assemble_step(config, args.shard_set, args.db)
        databases = [args.db]
    for db in databases:
        if not config.build.assemble:
            print(f"{db}: not assembled (build.assemble is false)")
        else:
            _report_built(db)
    return 0


def _pipeline_verify(args: argparse.Namespace) -> int:
    from datumdb.pipeline.check import verify_splits, verify_step
    from datumdb.pipeline.plan import read_plan

    per_split = ("train_db", "details", "metrics", "histogram", "sheet")
    if args.split is None:
        given = [name for name in (*per_split, "plan") if getattr(args, name) is not None]
        if given:
            option = "--" + given[0].replace("_", "-")
            raise InputError(f"{option} needs --split (without it, the reports go where dvc.yaml lists them)")
        results = verify_splits(_config(args), args.db, jobs=args.jobs)
        found = {args.db / split: result for split, result in results.items()}
    else:
        missing = [name for name in per_split if getattr(args, name) is None]
        if missing:
            raise InputError(f"--split {args.split} needs --{missing[0].replace('_', '-')}")
        found = {
            args.db: verify_step(
                _config(args),
                args.split,
                args.db,
                args.train_db,
                details=args.details,
                metrics=args.metrics,
                histogram=args.histogram,
                sheet=args.sheet,
                plan=read_plan(args.plan) if args.plan is not None else None,
            )
        }
    failed = 0
    for db, (report, problems) in found.items():
        if problems:
            failed += 1
            for problem in problems:
                print(f"datumdb pipeline verify: {problem}", file=sys.stderr)
            print(f"{db}: FAILED ({len(problems)} problem(s)); no report written", file=sys.stderr)
            continue
        print(
            f"{db}: OK, {report['count']} records, {report['sampled']} sampled and matching the source, "
            f"nearest-class-mean accuracy {report['ncm_accuracy']} (chance {report['chance_accuracy']}), "
            f"{report['digest']}"
        )
    return 1 if failed else 0


def _pipeline_mean(args: argparse.Namespace) -> int:
    from datumdb.pipeline.mean import mean_step

    config = _config(args)  # refuses a params file the orchestrators would read differently, before any work
    result = mean_step(args.db, binaryproto=args.binaryproto, npy=args.npy, summary=args.json, seed=config.seed)
    for channel, value in enumerate(result["channel_means"]):
        print(f"mean_value channel [{channel}]: {value:.6f}")
    return 0


def _pipeline_report(args: argparse.Namespace) -> int:
    from datumdb.pipeline.summary import report_step

    _config(args)  # refuses a params file the orchestrators would read differently, before any work
    text, ok = report_step(args.details, args.mean, args.output)
    print(text, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
