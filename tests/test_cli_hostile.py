"""The CLI never shows a traceback: hostile options, list files, manifests, arrays and databases.

The contract (see ``datumdb.cli``): exit 0, or 1 only for a failed ``verify``, or 2 with exactly
one line on stderr, ``datumdb <verb>: error: ...`` (``datumdb: error: ...`` when no verb was
understood). Usage errors are one line too. Exit 3 (internal error) fails these tests.

``main`` is called in this process, with stdout and stderr replaced by strict UTF-8 streams (so
a file name that is not UTF-8 printed raw would fail, as it would on a real terminal). Damaged
``data.mdb`` files are read by a ``datumdb`` subprocess with a time limit, since LMDB can crash
or loop on them. Hypothesis is derandomized here, whatever the profile, with bounded examples
(``DATUMDB_FUZZ_SCALE=10`` runs ten times as many).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datumdb import DatabaseWriter
from datumdb.cli import main
from datumdb.manifest import read_manifest, write_manifest

pytestmark = pytest.mark.fuzz

READING_VERBS = ("inspect", "digest", "export", "compute-mean", "verify")


def fuzz_settings(examples: int) -> settings:
    """Derandomized, ``examples`` of them (times DATUMDB_FUZZ_SCALE, for a long hunt)."""
    return settings(
        max_examples=examples * int(os.environ.get("DATUMDB_FUZZ_SCALE", "1")),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small valid inputs of every kind, read only by the tests."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(5)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "sub" / "b.jpg"), rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "gray.png"), rng.integers(0, 256, (5, 4), dtype=np.uint8))
    (images / "text.png").write_text("not an image\n")
    (root / "list.txt").write_text("a.png 0\nsub/b.jpg 1\ngray.png 2\n")
    np.save(root / "X.npy", rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8))
    np.save(root / "y.npy", np.arange(6) % 3)
    with DatabaseWriter(root / "db", batch_size=7) as writer:  # several pages and transactions
        for i in range(120):
            writer.add(rng.integers(0, 256, (3, 6, 6), dtype=np.uint8), i % 4)
    with DatabaseWriter(root / "small", batch_size=3) as writer:
        for i in range(10):
            writer.add(rng.integers(0, 256, (1, 3, 3), dtype=np.uint8), i % 2)
    return root


@contextlib.contextmanager
def scratch(inputs: Path) -> Iterator[Path]:
    """A fresh empty folder, also the working directory, removed afterwards."""
    folder = Path(tempfile.mkdtemp(dir=inputs.parent))
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
        shutil.rmtree(folder, ignore_errors=True)


def run_main(argv: list[str | bytes]) -> tuple[int, str, str]:
    """main(argv) with strict UTF-8 stdout/stderr; returns (exit code, stdout, stderr)."""
    out, err = io.BytesIO(), io.BytesIO()
    out_text = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    err_text = io.TextIOWrapper(err, encoding="utf-8", errors="strict", write_through=True)
    with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
        code = main(argv)
    return code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8")


def check_outcome(argv: list[str | bytes], code: int, err: str, out: str = "") -> None:
    """The exact contract of every exit."""
    verb = next((a for a in map(os.fsdecode, argv) if not a.startswith("-")), None)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert err.endswith("\n") and err.count("\n") == 1, (argv, err)
        prefixes = ("datumdb: error: ", f"datumdb {verb}: error: ")
        assert err.startswith(prefixes), (argv, err)
    elif code == 1:
        assert verb == "verify", (argv, err)
        assert err or '"ok": false' in out, argv  # the problems, or the --json report
    else:
        assert code == 0, (argv, code, err)


def run_checked(argv: list[str | bytes]) -> tuple[int, str, str]:
    code, out, err = run_main(argv)
    check_outcome(argv, code, err, out)
    return code, out, err


# ------------------------------------------------------------------------ option values

NUMBERS = [
    "nan", "inf", "-inf", "1e400", "-0", "0x10", "1_0", " 3", "", "0", "1", "-1",
    str(2**31 - 1), str(2**31), str(2**32 - 1), str(2**32), str(2**44), str(2**44 + 1), str(2**63), str(2**64),
    "65535", "65536", str(10**9), "9" * 5000, "1e-300", "3.5", "\x00", "\udcff", "٣",
]  # fmt: skip
VALUES = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(NUMBERS), st.text(max_size=12))

OPTIONS = {
    "convert-imageset": ["--seed", "--resize-height", "--resize-width", "--batch-size", "--map-size", "--workers",
                         "--encode-type"],
    "convert-arrays": ["--batch-size", "--map-size", "--layout", "--encode"],
    "inspect": ["--records"],
    "verify": ["--timeout"],
}  # fmt: skip


def positional(verb: str, inputs: Path, out: Path) -> list[str]:
    return {
        "convert-imageset": [str(inputs / "images"), str(inputs / "list.txt"), str(out / "db")],
        "convert-arrays": [str(inputs / "X.npy"), str(inputs / "y.npy"), str(out / "db")],
        "inspect": [str(inputs / "small")],
        "verify": [str(inputs / "small")],
    }[verb]


@st.composite
def option_argv(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]], list[str]]:
    verb = draw(st.sampled_from(sorted(OPTIONS)))
    chosen = draw(st.lists(st.sampled_from(OPTIONS[verb]), min_size=1, max_size=3, unique=True))
    flags = draw(st.lists(st.sampled_from(["--shuffle", "--gray", "--encoded", "--check-size", "--json"]), max_size=2))
    return verb, [(option, draw(VALUES)) for option in chosen], flags


@fuzz_settings(80)
@given(case=option_argv())
def test_hostile_option_values(inputs: Path, case: tuple[str, list[tuple[str, str]], list[str]]) -> None:
    verb, options, flags = case
    flags = [f for f in flags if f != "--json" or verb in ("inspect", "verify")]
    if verb != "convert-imageset":
        flags = [f for f in flags if f == "--json"]
    with scratch(inputs) as out:
        argv = ["--no-progress", verb, *positional(verb, inputs, out), *flags]
        for option, value in options:
            argv += [f"{option}={value}"]  # "=": a value starting with "-" is still the value
        if verb == "verify":
            argv.append("--in-process")  # the time limit is parsed all the same
        code, _, _ = run_checked(argv)
        if code == 0 and verb.startswith("convert"):
            assert run_checked(["--no-progress", "verify", "--in-process", str(out / "db")])[0] == 0


@fuzz_settings(60)
@given(
    tokens=st.lists(
        st.one_of(
            st.sampled_from([*READING_VERBS, "convert-imageset", "convert-arrays", "--json", "--records", "--overwrite",
                             "--timeout", "--seed", "--in-process", "--npy", "-h", "--", "-", "DB", "X.npy", "\x00"]),
            st.text(max_size=10),
        ),
        max_size=6,
    ),
    verb=st.sampled_from([*READING_VERBS, "convert-arrays", "convert-imageset"]),
)  # fmt: skip
def test_hostile_command_lines(inputs: Path, tokens: list[str], verb: str) -> None:
    """Random tokens after a verb: any mix of options, values, NUL and unpaired surrogates."""
    with scratch(inputs):
        shutil.copytree(inputs / "small", "DB")
        np.save("X.npy", np.zeros((2, 2, 2), np.uint8))
        tokens = [t for t in tokens if t not in ("-h",)]
        argv = ["--no-progress", verb, *tokens]
        if verb == "verify":
            argv.insert(2, "--in-process")
        run_checked(argv)


# ------------------------------------------------------------------------ list files

LIST_PATHS = ["a.png", "sub/b.jpg", "gray.png", "text.png", "missing.png", "sub", "../images/a.png", "/etc/passwd",
              "a.png\x00", "a b.png", "", " ", "é.png", "sub/../a.png"]  # fmt: skip
LABELS = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(str),
    st.sampled_from([str(2**31), str(-(2**31) - 1), "9" * 5000, "x", "", "1.5", "+3", "-0", "٣", "1_0", "0x1"]),
)
LINE = st.one_of(
    st.tuples(st.sampled_from(LIST_PATHS), st.sampled_from([" ", "  ", "\t", ""]), LABELS).map(
        lambda t: (t[0] + t[1] + t[2]).encode("utf-8", "surrogatepass")
    ),
    st.binary(max_size=30),
)


@fuzz_settings(80)
@given(
    lines=st.lists(LINE, max_size=6),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r", b"\x00"]),
    last=st.booleans(),
    flags=st.lists(
        st.sampled_from(["--gray", "--encoded", "--encode-type=png", "--check-size", "--shuffle", "--workers=1"]),
        max_size=3,
        unique=True,
    ),
    resize=st.sampled_from([[], ["--resize-height=3", "--resize-width=2"], ["--resize-height=7"]]),
)
def test_hostile_list_files(
    inputs: Path, lines: list[bytes], ending: bytes, last: bool, flags: list[str], resize: list[str]
) -> None:
    with scratch(inputs) as out:
        data = ending.join(lines) + (ending if last and lines else b"")
        (out / "list.txt").write_bytes(data)
        argv = ["--no-progress", "convert-imageset", str(inputs / "images"), str(out / "list.txt"), str(out / "db")]
        code, _, _ = run_checked([*argv, *flags, *resize])
        if code == 0:
            assert run_checked(["--no-progress", "verify", "--in-process", str(out / "db")])[0] == 0
        else:
            assert not (out / "db").exists()


# ------------------------------------------------------------------------ manifests

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**30, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
MANIFEST_FIELDS = ["count", "digest", "shapes", "dtype", "encoding", "channel_order", "label_histogram", "data_mdb",
                   "chunk_digests", "format", "key_width", "metadata"]  # fmt: skip


@st.composite
def hostile_manifest(draw: st.DrawFn) -> tuple[str, object]:
    """(kind, content): raw bytes, any JSON text, deep nesting, or a manifest with a valid
    checksum whose fields have hostile values (so it passes the checksum and reaches the code)."""
    kind = draw(st.sampled_from(["bytes", "json", "deep", "digits", "fields"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=64))
    if kind == "json":
        return kind, json.dumps(draw(JSON_VALUES)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([900, 1100, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return kind, (opener * depth + "1" + closer * depth).encode()
    if kind == "digits":
        return kind, (
            '{"format": "datumdb-manifest/1", "count": 1' + "0" * draw(st.sampled_from([10, 5000])) + "}"
        ).encode()
    fields = draw(st.dictionaries(st.sampled_from(MANIFEST_FIELDS), JSON_VALUES, min_size=1, max_size=4))
    return kind, fields


@fuzz_settings(80)
@given(manifest=hostile_manifest(), verb=st.sampled_from(READING_VERBS), as_json=st.booleans())
def test_hostile_manifests(inputs: Path, manifest: tuple[str, object], verb: str, as_json: bool) -> None:
    kind, content = manifest
    with scratch(inputs) as out:
        db = out / "db"
        shutil.copytree(inputs / "small", db)
        if kind == "fields":
            assert isinstance(content, dict)
            write_manifest(db, {**read_manifest(db), **content})  # a valid checksum over hostile values
        else:
            assert isinstance(content, bytes)
            (db / "datumdb.json").write_bytes(content)
        argv = ["--no-progress", verb, str(db)]
        if verb in ("export", "compute-mean"):
            argv.append(str(out / "result"))
        if verb == "verify":
            argv.append("--in-process")
        if as_json and verb in ("inspect", "verify"):
            argv.append("--json")
        run_checked(argv)


def test_a_deeply_nested_manifest_fails_verification_in_the_isolated_child_too(inputs: Path) -> None:
    with scratch(inputs) as out:
        shutil.copytree(inputs / "small", out / "db")
        (out / "db" / "datumdb.json").write_text("[" * 100_000 + "]" * 100_000)
        code, _, err = run_checked(["--no-progress", "verify", str(out / "db")])
        assert code == 1 and "manifest" in err


# ------------------------------------------------------------------------ .npy files

DTYPES = ["|u1", "<f4", ">f8", "|O", "<U3", "<i8", "|b1", "<c8", "|V4", "<M8[s]"]


@st.composite
def npy_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 2**31, 2**62]), max_size=5))
    header = {
        "descr": draw(st.sampled_from(DTYPES)),
        "fortran_order": draw(st.booleans()),
        "shape": tuple(shape),
    }
    text = repr(header) if draw(st.integers(0, 9)) else draw(st.text(max_size=20))
    text = text.ljust(118) + "\n"
    head = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin-1", "replace")
    return head + draw(st.binary(max_size=200))


@fuzz_settings(60)
@given(images=npy_bytes(), labels=npy_bytes(), valid=st.sampled_from(["none", "images", "labels"]))
def test_hostile_npy_files(inputs: Path, images: bytes, labels: bytes, valid: str) -> None:
    with scratch(inputs) as out:
        (out / "X.npy").write_bytes((inputs / "X.npy").read_bytes() if valid == "images" else images)
        (out / "y.npy").write_bytes((inputs / "y.npy").read_bytes() if valid == "labels" else labels)
        argv = ["--no-progress", "convert-arrays", str(out / "X.npy"), str(out / "y.npy"), str(out / "db")]
        code, _, _ = run_checked(argv)
        if code != 0:
            assert not (out / "db").exists()


# ------------------------------------------------------------------------ file names


@pytest.mark.parametrize("name", ["db\udcff", "d\udce9b", "\udc80"])
def test_names_that_are_not_utf8(inputs: Path, name: str) -> None:
    """Undecodable bytes in names (surrogate escapes, as Python decodes argv) work, and print
    as \\xNN in messages instead of failing the output stream."""
    with scratch(inputs) as out:
        db = out / name
        shutil.copytree(inputs / "small", db)
        for argv in (["inspect", str(db)], ["digest", str(db)], ["verify", "--in-process", str(db)]):
            assert run_checked(["--no-progress", *argv])[0] == 0
        assert "\\x" in run_checked(["inspect", str(db)])[1]
        code, _, err = run_checked(["--no-progress", "digest", str(out / (name + "absent"))])
        assert code == 2 and "\\x" in err
        built = out / ("built" + name)
        argv = ["--no-progress", "convert-arrays", str(inputs / "X.npy"), str(inputs / "y.npy"), str(built)]
        assert run_checked(argv)[0] == 0
        list_file = out / ("list" + name)
        list_file.write_text("a.png 1\n")
        argv = ["--no-progress", "convert-imageset", str(inputs / "images"), str(list_file), str(out / "x")]
        assert run_checked(argv)[0] == 0


def test_a_listed_name_that_is_not_utf8_is_an_error_naming_the_line(inputs: Path) -> None:
    with scratch(inputs) as out:
        (out / "list.txt").write_bytes(b"a.png 0\n\xff\xfe.png 1\n")
        argv = ["--no-progress", "convert-imageset", str(inputs / "images"), str(out / "list.txt"), str(out / "db")]
        code, _, err = run_checked(argv)
        assert code == 2 and "list.txt" in err and "UTF-8" in err


def test_a_surrogate_that_is_no_byte_is_bad_input(inputs: Path) -> None:
    """An unpaired surrogate in a name can not be encoded for the OS at all."""
    with scratch(inputs) as out:
        assert run_checked(["--no-progress", "digest", str(out / "\ud800")])[0] == 2


# ------------------------------------------------------------------------ damaged data.mdb


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, list[tuple[float, int]]]:
    kind = draw(st.sampled_from(["flip", "flip-many", "truncate", "zero-page", "garbage-page"]))
    count = {"flip": (1, 8), "flip-many": (20, 300)}.get(kind, (1, 1))
    edits = draw(
        st.lists(
            st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=count[0], max_size=count[1]
        )
    )
    return kind, edits


def damaged_copy(source: Path, target: Path, kind: str, edits: list[tuple[float, int]]) -> None:
    shutil.copytree(source, target)
    data = bytearray((target / "data.mdb").read_bytes())
    size = len(data)
    page = 4096
    for where, value in edits:
        at = int(where * size)
        if kind.startswith("flip"):
            data[at] ^= value
        elif kind == "truncate":
            del data[at:]
        else:
            start = at // page * page
            noise = bytes(np.random.default_rng(value).integers(0, 256, page, dtype=np.uint8))
            data[start : start + page] = bytes(page) if kind == "zero-page" else noise
    (target / "data.mdb").write_bytes(bytes(data))


@pytest.mark.slow
@fuzz_settings(30)
@given(damaged=damage(), verb=st.sampled_from(READING_VERBS))
def test_damaged_databases_are_bad_input_not_crashes(inputs: Path, damaged: tuple[str, list], verb: str) -> None:
    """A real ``datumdb`` process (LMDB can crash or loop on a damaged file): exit 0 or 2 (1 for
    verify), one line, no traceback, within the time limit."""
    kind, edits = damaged
    with scratch(inputs) as out:
        damaged_copy(inputs / "db", out / "db", kind, edits)
        argv = ["--no-progress", verb, str(out / "db")]
        if verb in ("export", "compute-mean"):
            argv.append(str(out / "result"))
        if verb == "verify":
            argv += ["--timeout", "60"]
        child = subprocess.run(
            [sys.executable, "-m", "datumdb.cli", *argv],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        err = child.stderr.decode("utf-8")
        check_outcome(argv, child.returncode, err, child.stdout.decode("utf-8"))
        if child.returncode == 2:
            assert str(out / "db") in err, err


@pytest.mark.parametrize("verb", ["inspect", "digest", "export", "compute-mean"])
def test_a_truncated_database_is_named_in_one_line(inputs: Path, verb: str) -> None:
    with scratch(inputs) as out:
        damaged_copy(inputs / "db", out / "db", "truncate", [(0.6, 1)])
        argv = ["--no-progress", verb, str(out / "db")] + (
            [str(out / "result")] if verb in ("export", "compute-mean") else []
        )
        code, _, err = run_checked(argv)
        assert code == 2 and "data.mdb is truncated" in err and str(out / "db") in err


@pytest.mark.parametrize("in_process", [True, False], ids=["main", "subprocess"])
def test_a_page_that_makes_lmdb_abort_is_one_line_naming_the_database(inputs: Path, in_process: bool) -> None:
    """LMDB asserts (and aborts) on this zeroed page: the reader's check of the B-tree refuses
    it before LMDB walks it (and the reading verbs run in a forked child besides), in one line."""
    with scratch(inputs) as out:
        damaged_copy(inputs / "db", out / "db", "zero-page", [(0.5, 1)])
        argv = ["--no-progress", "digest", str(out / "db")]
        if in_process:
            code, _, err = run_checked(argv)
        else:
            child = subprocess.run([sys.executable, "-m", "datumdb.cli", *argv], capture_output=True, check=False)
            code, err = child.returncode, child.stderr.decode("utf-8")
            check_outcome(argv, code, err)
        assert code == 2, err
        assert err.startswith(f"datumdb digest: error: {out / 'db' / 'data.mdb'}: damaged B-tree: page "), err
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["--strict", "--allow-nonfinite", "--heartbeat=5", "--no-progress"])
def test_verify_checks_a_database_named_like_an_option(inputs: Path, name: str) -> None:
    """`verify -- --strict` printed the isolated child's traceback and reported FAILED: the child
    took the first argument not starting with '--' for the database."""
    with scratch(inputs) as out:
        shutil.copytree(inputs / "small", out / name)
        code, text, err = run_checked(["--no-progress", "verify", "--", name])
        assert code == 0 and text.startswith(f"{name}: OK, 10 records"), err
        assert err == ""


def test_a_failed_verify_that_read_no_record_does_not_count_none_bad_records(inputs: Path) -> None:
    """The isolated child died in LMDB before reading records: 'FAILED (1 problem(s), None bad
    record(s))' became '(1 problem(s))'; where records were read, the count stays."""
    with scratch(inputs) as out:
        damaged_copy(inputs / "db", out / "db", "zero-page", [(0.5, 1)])
        code, _, err = run_checked(["--no-progress", "verify", str(out / "db")])
        assert code == 1 and "None" not in err, err
        report = json.loads(run_main(["--no-progress", "verify", "--json", str(out / "db")])[1])
        counted = "" if report["bad_records"] is None else f", {report['bad_records']} bad record(s)"
        assert err.endswith(f"{out / 'db'}: FAILED ({len(report['problems'])} problem(s){counted})\n"), err


# ------------------------------------------------------------------------ hostile records


@st.composite
def hostile_value(draw: st.DrawFn) -> bytes:
    """A serialized Datum with any field values (or random bytes): what a foreign tool could store."""
    from datumdb.proto.datum_pb2 import Datum

    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=40))
    dims = st.one_of(st.integers(0, 4), st.sampled_from([-1, 2**31 - 1, -(2**31)]))
    datum = Datum()
    for name in ("channels", "height", "width"):
        if draw(st.booleans()):
            setattr(datum, name, draw(dims))
    datum.label = draw(st.integers(-(2**31), 2**31 - 1))
    kind = draw(st.sampled_from(["data", "float", "encoded", "empty"]))
    if kind == "data":
        datum.data = draw(st.binary(max_size=64))
    elif kind == "float":
        datum.float_data.extend(draw(st.lists(st.floats(width=32), max_size=64)))
    if kind in ("data", "float") and draw(st.booleans()):  # a consistent shape: the values get used
        datum.channels, datum.height, datum.width = 1, 1, max(len(datum.data), len(datum.float_data))
    elif kind == "encoded":
        datum.encoded = True
        datum.data = draw(
            st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", cv2.imencode(".png", np.zeros((2, 3), np.uint8))[1].tobytes()])
        )
    return datum.SerializeToString()


@fuzz_settings(60)
@given(
    records=st.lists(st.tuples(st.binary(min_size=1, max_size=16), hostile_value()), min_size=1, max_size=5),
    uniform=st.integers(0, 3),
    verb=st.sampled_from(READING_VERBS),
)
def test_hostile_records(inputs: Path, records: list[tuple[bytes, bytes]], uniform: int, verb: str) -> None:
    """A valid LMDB (no manifest) whose records are anything: bad input or a failed verify."""
    import lmdb

    rng = np.random.default_rng(uniform)
    from datumdb.codec import encode_array

    good = [(b"%08d" % i, encode_array(rng.integers(0, 256, (3, 2, 2), dtype=np.uint8), i)) for i in range(uniform)]
    with scratch(inputs) as out:
        env = lmdb.open(str(out / "db"), map_size=1 << 22, subdir=True, lock=False)
        with env.begin(write=True) as txn:
            for key, value in [*good, *records]:
                txn.put(key, value)
        env.close()
        argv = ["--no-progress", verb, str(out / "db")]
        if verb in ("export", "compute-mean"):
            argv.append(str(out / "result"))
        if verb == "verify":
            argv.append("--in-process")
        run_checked(argv)


@pytest.mark.parametrize(
    ("value", "message"),
    [(3e38, "key '00000001': the float32 running sum overflows"), (np.inf, "key '00000000': float_data holds NaN")],
)
def test_compute_mean_refuses_an_infinite_mean(inputs: Path, value: float, message: str) -> None:
    """Caffe would write inf or NaN means; datumdb names the record instead."""
    with scratch(inputs) as out:
        with DatabaseWriter(out / "db") as writer:
            for _ in range(3):
                writer.add(np.full((1, 2, 2), 3e38, np.float32), 0)
        if value == np.inf:  # the writer refuses non-finite floats: store one as a foreign tool would
            import lmdb

            from datumdb.proto.datum_pb2 import Datum

            env = lmdb.open(str(out / "db"), subdir=True, lock=False)
            with env.begin(write=True) as txn:
                datum = Datum(channels=1, height=2, width=2, label=0)
                datum.float_data.extend([1.0, value, 2.0, 3.0])
                txn.put(b"00000000", datum.SerializeToString())
            env.close()
        code, _, err = run_checked(["--no-progress", "compute-mean", str(out / "db"), str(out / "m.bp")])
        assert code == 2 and message in err, err
        assert not (out / "m.bp").exists()


def test_main_takes_bytes_arguments(inputs: Path) -> None:
    """As the OS gives them: b"db\\xff" names the same folder as Python's "db\\udcff"."""
    with scratch(inputs) as out:
        shutil.copytree(inputs / "small", os.fsdecode(os.fsencode(out) + b"/db\xff"))
        code, text, _ = run_checked([b"--no-progress", b"inspect", os.fsencode(out) + b"/db\xff"])
        assert code == 0 and "db\\xff: 10 records" in text


def _manifest_with(db: Path, **fields: object) -> None:
    write_manifest(db, {**read_manifest(db), **fields})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nul-in-list", "list.txt:2: path 'a\\x00.png' contains a NUL byte"),
        ("label-5000-digits", "list.txt:1: label 9999999999"),
        ("manifest-5000-digits", "manifest is not valid JSON"),
        ("manifest-wrong-type", "manifest field 'shapes' is not an object of non-negative integer counts"),
        ("manifest-count-text", "manifest field 'count' is not a non-negative integer"),
        ("empty-npy", "X.npy: not a readable .npy images file"),
        ("huge-npy-shape", "X.npy: 129 bytes, but its header"),
    ],
)
def test_what_fuzzing_found(inputs: Path, case: str, message: str) -> None:
    """Each a traceback, or several lines, before; now exit 2 (or a failed verify) with one line."""
    with scratch(inputs) as out:
        images, db = str(inputs / "images"), out / "db"
        if case == "nul-in-list":
            (out / "list.txt").write_bytes(b"a.png 0\na\x00.png 1\n")
            argv = ["convert-imageset", images, str(out / "list.txt"), str(db)]
        elif case == "label-5000-digits":
            (out / "list.txt").write_text("a.png " + "9" * 5000 + "\n")
            argv = ["convert-imageset", images, str(out / "list.txt"), str(db)]
        elif case.startswith("manifest"):
            shutil.copytree(inputs / "small", db)
            if case == "manifest-5000-digits":
                (db / "datumdb.json").write_text('{"count": 1' + "0" * 5000 + "}")
            else:
                _manifest_with(db, **({"shapes": None} if case == "manifest-wrong-type" else {"count": "x"}))
            argv = ["verify", "--in-process", str(db)]
        else:
            header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,)}".ljust(118) + "\n"
            npy = b"" if case == "empty-npy" else b"\x93NUMPY\x01\x00w\x00" + header.encode()
            (out / "X.npy").write_bytes(npy)
            argv = ["convert-arrays", str(out / "X.npy"), str(inputs / "y.npy"), str(db)]
        code, _, err = run_checked(["--no-progress", *argv])
        assert code == (1 if argv[0] == "verify" else 2), err
        assert message in err, err
        for verb in ("inspect", "digest") if case.startswith("manifest") else ():
            assert run_checked(["--no-progress", verb, str(db)])[0] == 0  # the records are fine


def test_opencv_warnings_do_not_add_lines(inputs: Path) -> None:
    """A truncated PNG made OpenCV print '[ WARN:0@...] ... PNG input buffer is incomplete'."""
    with scratch(inputs) as out:
        png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
        (out / "images").mkdir()
        (out / "images" / "cut.png").write_bytes(png[: len(png) // 2])
        (out / "list.txt").write_text("cut.png 1\n")
        argv = ["--no-progress", "convert-imageset", str(out / "images"), str(out / "list.txt"), str(out / "db")]
        child = subprocess.run([sys.executable, "-m", "datumdb.cli", *argv], capture_output=True, check=False)
        check_outcome(argv, child.returncode, child.stderr.decode("utf-8"))
        assert child.returncode == 2 and b"cut.png: not an image" in child.stderr
