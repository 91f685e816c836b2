"""Faults, damage and hostile input: nothing lost, nothing half-written, clear errors.

Every loop here is bounded in trials and time. The figures (trials, faults, records lost) are
what the README's reliability section reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datumdb import DatabaseWriter, DatumReader
from datumdb.codec import datum_to_array, decode, encode_array, encode_image
from datumdb.errors import DatumError
from datumdb.manifest import read_manifest
from datumdb.verify import content_digest, verify_database

pytestmark = pytest.mark.slow

DATUMDB = [sys.executable, "-m", "datumdb.cli", "--no-progress"]


def _folder_state(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _arrays(tmp_path: Path, count: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    images, labels = tmp_path / "X.npy", tmp_path / "y.npy"
    np.save(images, rng.integers(0, 256, (count, *shape), dtype=np.uint8))
    np.save(labels, rng.integers(0, 10, count))
    return images, labels


def _imageset(tmp_path: Path, count: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i in range(count):
        name = f"img_{i:04d}.png"
        cv2.imwrite(str(root / name), rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8))
        lines.append(f"{name} {i % 5}")
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return root, list_file


# --------------------------------------------------------------------------- crashes


def _kill_trials(command: list[str], target: Path, trials: int, seed: int) -> dict[str, int]:
    """SIGKILL the build at random moments; after each kill the target must be absent or the
    complete previous version, and a rerun must give the uninterrupted build's digest."""
    reference = target.parent / "reference"
    started = time.monotonic()
    subprocess.run([*command[:-1], str(reference)], check=True)
    duration = time.monotonic() - started
    expected = read_manifest(reference)["digest"]
    complete = _folder_state(reference)
    rng = random.Random(seed)
    stats = {"trials": 0, "killed_mid_build": 0, "records_lost": 0}
    for trial in range(trials):
        before = _folder_state(target)
        build = subprocess.Popen([*command, "--overwrite"] if before else command)
        saw_partial = False
        if trial % 4:  # most kills land inside the build: wait for its folder, then a random while
            while not _leftovers(target) and build.poll() is None:
                time.sleep(0.002)
            saw_partial = bool(_leftovers(target))
            deadline = time.monotonic() + rng.uniform(0, duration / 3)
        else:  # the rest anywhere, start-up and publish included
            deadline = time.monotonic() + rng.uniform(0, duration)
        while time.monotonic() < deadline and build.poll() is None:
            saw_partial = saw_partial or bool(_leftovers(target))
            time.sleep(0.002)
        build.kill()
        code = build.wait()
        stats["trials"] += 1
        after = _folder_state(target)
        # A killed build leaves the previous version; one killed after its rename leaves the new
        # version, complete (same inputs, deterministic: the reference's exact bytes).
        assert after in (before, complete), f"trial {trial} (exit {code}): target is neither old nor new"
        stats["killed_mid_build"] += code != 0 and saw_partial
        if trial % 3 == 2:  # rerun to completion: identical digest, stale build folders gone
            subprocess.run([*command, "--overwrite"] if after else command, check=True)
            manifest = read_manifest(target)
            assert manifest["digest"] == expected
            stats["records_lost"] += read_manifest(reference)["count"] - manifest["count"]
            assert _leftovers(target) == [], f"trial {trial}: stale build folders {_leftovers(target)}"
    assert verify_database(target)["ok"]
    return stats


def test_kill_9_during_convert_arrays_never_leaves_a_partial_database(tmp_path: Path) -> None:
    images, labels = _arrays(tmp_path, 4000)
    target = tmp_path / "db"
    command = [
        *DATUMDB,
        "convert-arrays",
        str(images),
        str(labels),
        "--batch-size",
        "25",
        "--map-size",
        "65536",
        str(target),
    ]
    stats = _kill_trials(command, target, trials=12, seed=12)
    assert stats["records_lost"] == 0
    assert stats["killed_mid_build"] >= 6, stats  # the kills really landed inside builds


def test_kill_9_during_convert_imageset_never_leaves_a_partial_database(tmp_path: Path) -> None:
    root, list_file = _imageset(tmp_path, 800)
    target = tmp_path / "db"
    command = [
        *DATUMDB,
        "convert-imageset",
        "--workers",
        "1",
        "--batch-size",
        "10",
        "--resize-height",
        "32",
        "--resize-width",
        "32",
        str(root),
        str(list_file),
        str(target),
    ]
    stats = _kill_trials(command, target, trials=10, seed=10)
    assert stats["records_lost"] == 0
    assert stats["killed_mid_build"] >= 5, stats


# The CLI in a child that reports each rename of the publish on stdout ("aside": the previous
# version was moved aside, "in": the new one was moved in) and pauses after it, so that a kill
# can be aimed at the moments between them. argv: TARGET PAUSE ARGS...
_RENAME_REPORTER = """
import os, sys, time
from datumdb.cli import main
target, pause = sys.argv[1], float(sys.argv[2])
real_rename = os.rename
def rename(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    step = "aside" if os.fspath(src) == target else "in" if os.fspath(dst) == target else "other"
    os.write(1, (step + "\\n").encode())
    time.sleep(pause)
os.rename = rename
raise SystemExit(main(["--no-progress", *sys.argv[3:]]))
"""


def _wait_for_line(process: subprocess.Popen[bytes], wanted: str, deadline: float) -> bool:
    """Read the child's stdout until the line ``wanted``; False if it ended or time ran out."""
    assert process.stdout is not None
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.05)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                return False
            buffer += chunk
            if wanted.encode() + b"\n" in buffer.split(b"\n") or f"{wanted}\n".encode() in buffer:
                return True
    return False


def test_kills_during_a_rebuild_without_rename_exchange_never_lose_the_database(tmp_path: Path, record_property):
    """The fallback publish (forced by DATUMDB_NO_RENAME_EXCHANGE=1, as on NFS): kill -9, SIGTERM or
    SIGINT right after the previous version was moved aside, right after the new one was moved in, or at
    a random moment. After each kill the target is the complete old or new version, or absent with
    the old one complete aside, which the next verify or build restores; never neither."""
    env = {**os.environ, "DATUMDB_NO_RENAME_EXCHANGE": "1"}
    sources = [_arrays(tmp_path / name, 300, shape=(3, 16, 16), seed=i) for i, name in enumerate("ab")]
    states, digests = [], []
    started = time.monotonic()
    for i, (images, labels) in enumerate(sources):
        reference = tmp_path / f"ref{i}"
        subprocess.run([*DATUMDB, "convert-arrays", str(images), str(labels), str(reference)], check=True, env=env)
        states.append(_folder_state(reference))
        digests.append(read_manifest(reference)["digest"])
    duration = (time.monotonic() - started) / 2
    target = tmp_path / "db"
    subprocess.run([*DATUMDB, "convert-arrays", *map(str, sources[0]), str(target)], check=True, env=env)
    current, pause, rng = 0, 0.15, random.Random(11)
    stats = Counter()
    trials = 45
    stop_by = time.monotonic() + 300
    for trial in range(trials):
        assert time.monotonic() < stop_by, f"out of time after {trial} trials: {dict(stats)}"
        new = 1 - current
        phase = ("aside", "in", "random")[trial % 3]
        sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[(trial // 3) % 3]
        build = subprocess.Popen(
            [sys.executable, "-c", _RENAME_REPORTER, str(target), str(pause),
             "convert-arrays", *map(str, sources[new]), str(target), "--overwrite"],
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            if phase == "random":
                time.sleep(rng.uniform(0, duration))
            else:
                assert _wait_for_line(build, phase, time.monotonic() + 60), f"trial {trial}: no {phase!r} rename"
                time.sleep(rng.uniform(0, pause * 0.8))
            build.send_signal(sig)
            code = build.wait(timeout=60)
        finally:
            build.kill()
            build.wait()
            assert build.stdout is not None
            build.stdout.close()
        after = _folder_state(target)
        stats[f"{phase}/{signal.Signals(sig).name}/exit {'ok' if code == 0 else 'killed'}"] += 1
        if after is None:
            # Only a kill -9 between the two renames may leave this; SIGTERM and SIGINT are held.
            assert sig == signal.SIGKILL and phase in ("aside", "random"), (trial, phase, sig)
            stats["absent, then restored"] += 1
            if stats["absent, then restored"] % 2:  # alternately the next verify and the next build
                result = subprocess.run([*DATUMDB, "verify", str(target)], capture_output=True, text=True, env=env)
                assert result.returncode == 0, result.stderr
                assert "restored the previous version" in result.stderr
                assert _folder_state(target) == states[current]
                stats["restored by verify"] += 1
            else:
                rebuild = [*DATUMDB, "convert-arrays", *map(str, sources[new]), str(target), "--overwrite"]
                subprocess.run(rebuild, check=True, env=env)
                assert _folder_state(target) == states[new]
                current = new
                stats["restored by the next build"] += 1
        else:
            assert after in (states[current], states[new]), f"trial {trial}: target is neither version"
            if phase == "aside" and sig != signal.SIGKILL:
                assert after == states[new], "SIGTERM and SIGINT must wait until the new version is in place"
            current = states.index(after)
        stats["old" if current != new else "new"] += 1
        report = verify_database(target, isolate=True)
        assert report["ok"] and report["digest"] == digests[current], (trial, report["problems"])
    subprocess.run([*DATUMDB, "convert-arrays", *map(str, sources[0]), str(target), "--overwrite"], check=True, env=env)
    assert _leftovers(target) == [], "the next build must remove what the killed ones left"
    assert verify_database(target)["ok"]
    record_property("fallback_kill_trials", dict(stats))
    print(f"fallback publish kill trials: {trials}, {dict(stats)}")
    assert stats["absent, then restored"] >= 3, stats  # the dangerous moment was really hit
    assert stats["restored by verify"] >= 1 and stats["restored by the next build"] >= 1, stats


# --------------------------------------------------------------------------- resource limits


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a kill


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    images, labels = _arrays(tmp_path, 3000)  # ~9 MB of records against a 2 MB file size limit
    target = tmp_path / "db"
    result = subprocess.run(
        [*DATUMDB, "convert-arrays", str(images), str(labels), str(target)],
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert str(target) in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()
    assert _leftovers(target) == []


def test_map_growth_from_a_tiny_map_loses_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (700, 3, 16, 16), dtype=np.uint8)
    with DatabaseWriter(tmp_path / "db", map_size=16 * 1024, batch_size=64) as writer:
        for i, image in enumerate(images):
            writer.add(image, i)
    assert writer.grow_count >= 5
    reader = DatumReader(tmp_path / "db")
    assert len(reader) == len(images)
    batch, labels = reader.read_batch(np.arange(len(images)))
    assert np.array_equal(batch, images) and np.array_equal(labels, np.arange(len(images)))


# --------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def intact_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("intact") / "db"
    rng = np.random.default_rng(5)
    with DatabaseWriter(path, batch_size=50) as writer:
        for i in range(300):
            writer.add(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), i % 7)
    return path


def _damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated to {cut}"
    positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
    for position in positions:
        data[position] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return f"flipped bytes at {positions}"


def test_verify_never_passes_a_damaged_database(intact_db: Path, tmp_path: Path) -> None:
    assert verify_database(intact_db, isolate=True)["ok"]
    rng = random.Random(2024)
    named_key = 0
    trials = 110
    for trial in range(trials):
        damaged = tmp_path / f"trial{trial}"
        shutil.copytree(intact_db, damaged)
        victim = damaged / ("datumdb.json" if trial % 5 == 0 else "data.mdb")
        what = _damage(victim, rng)
        report = verify_database(damaged, isolate=True, timeout=60)
        assert not report["ok"], f"trial {trial}: {victim.name} {what} passed verification"
        assert report["problems"], report
        named_key += any("key '" in problem for problem in report["problems"])
        shutil.rmtree(damaged)
    assert named_key > 0  # where a record itself is broken, the key is named


def test_cli_verify_reports_damage_with_exit_code_1(intact_db: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(intact_db, damaged)
    data = bytearray((damaged / "data.mdb").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "data.mdb").write_bytes(bytes(data))
    result = subprocess.run([*DATUMDB, "verify", str(damaged)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "data.mdb sha256" in result.stderr


# --------------------------------------------------------------------------- hostile Datums

_VALID = [
    encode_array(np.arange(48, dtype=np.uint8).reshape(3, 4, 4), 7),
    encode_array(np.ones((1, 2, 3), np.float32), -(2**31)),
    encode_image(cv2.imencode(".png", np.full((5, 6, 3), 9, np.uint8))[1].tobytes(), 2**31 - 1),
]


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_decoder_on_random_bytes_raises_only_datum_error(value: bytes) -> None:
    try:
        datum_to_array(decode(value, b"k"), key=b"k")
    except DatumError as exc:
        assert "k" in str(exc)


@settings(deadline=None)
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 10_000),
)
def test_decoder_on_mutated_datums_raises_only_datum_error(value: bytes, edits: list, cut: int) -> None:
    data = bytearray(value)
    for position, byte in edits:
        data[position % len(data)] = byte
    with contextlib.suppress(DatumError):
        datum_to_array(decode(bytes(data[: max(cut, 1)]), b"key"), key=b"key")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x22" + b"\xff" * 9 + b"\x01", "declares"),  # length field of ~2**63 bytes
        (b"\x22\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "longer than ten bytes"),
        (b"\x08" + b"\xff" * 9 + b"\x7f", "overflows 64 bits"),
        (b"\x0a\x00", "wire type 2"),  # channels sent as bytes
        (b"\x08\xff\xff\xff\xff\x0f\x10\x01\x18\x01", "negative"),  # channels = -1
        (b"\x4b", "unsupported wire type"),  # a group, in an unknown field
        (b"\x08\x03\x10\x02\x18\x02\x22\x03abc\x28\x00", "data holds 3 bytes"),
        (b"\x22\x04abcd\x28\x00\x38\x01", "cannot decode"),  # garbage "encoded image"
        (b"\x08\x01\x10\x40\x18\x40\x35\x00\x00\x80\x3f", "float_data holds 1"),
    ],
)
def test_hostile_datums_get_a_clear_error_without_allocating(value: bytes, message: str) -> None:
    with pytest.raises(DatumError, match=message) as info:
        datum_to_array(decode(value, b"evil"), key=b"evil")
    assert "'evil'" in str(info.value)


def test_forged_image_header_cannot_make_opencv_allocate_gigabytes() -> None:
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    png[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR claims 60000 x 60000 pixels
    with pytest.raises(DatumError, match="cannot decode"):
        datum_to_array(decode(encode_image(bytes(png), 0), b"big"), key=b"big")


def test_png_chunk_claiming_gigabytes_is_rejected_before_opencv_allocates_them() -> None:
    # Found by the atheris run below: OpenCV allocated what a forged chunk length declared (4 GB).
    png = bytearray(cv2.imencode(".png", np.full((16, 20, 3), 7, np.uint8))[1].tobytes())
    idat = png.index(b"IDAT") - 4
    png[idat : idat + 4] = (0xFFFF4B93).to_bytes(4, "big")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatumError, match=r"PNG chunk b'IDAT' .* declares 4294921107 bytes"):
        datum_to_array(decode(encode_image(bytes(png), 0), b"forged"), key=b"forged")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: under 64 MB more


# --------------------------------------------------------------------------- concurrency


def _read_until(path: str, stop_at: float, digests: list[str], queue: multiprocessing.Queue) -> None:
    seen, failures = set(), []
    while time.monotonic() < stop_at:
        try:
            seen.add(content_digest(path))
        except Exception as exc:  # any failure to read a complete version is what we look for
            failures.append(repr(exc))
    queue.put((sorted(seen), failures, digests))


def test_readers_during_rebuilds_see_a_complete_old_or_new_version(tmp_path: Path) -> None:
    versions = [_arrays(tmp_path / f"v{seed}", 500, seed=seed) for seed in range(3)]
    target = tmp_path / "db"
    digests = []
    for images, labels in versions:
        subprocess.run(
            [*DATUMDB, "convert-arrays", str(images), str(labels), str(tmp_path / f"ref{len(digests)}")], check=True
        )
        digests.append(read_manifest(tmp_path / f"ref{len(digests)}")["digest"])
    subprocess.run([*DATUMDB, "convert-arrays", *map(str, versions[0]), str(target)], check=True)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    stop_at = time.monotonic() + 6
    readers = [context.Process(target=_read_until, args=(str(target), stop_at, digests, queue)) for _ in range(2)]
    for reader in readers:
        reader.start()
    rebuilds = 0
    while time.monotonic() < stop_at - 1:
        images, labels = versions[(rebuilds + 1) % 3]
        subprocess.run([*DATUMDB, "convert-arrays", str(images), str(labels), str(target), "--overwrite"], check=True)
        rebuilds += 1
    results = [queue.get(timeout=30) for _ in readers]
    for reader in readers:
        reader.join(timeout=30)
    assert rebuilds >= 3
    for seen, failures, _ in results:
        assert failures == []
        assert set(seen) <= set(digests) and seen


def test_two_builds_racing_for_one_target_cannot_interleave(tmp_path: Path) -> None:
    sources = [_arrays(tmp_path / name, 1500, seed=i) for i, name in enumerate("ab")]
    target = tmp_path / "db"
    for round_ in range(3):
        builds = [
            subprocess.Popen(
                [*DATUMDB, "convert-arrays", str(x), str(y), str(target), "--overwrite", "--batch-size", "50"],
                stderr=subprocess.PIPE,
                text=True,
            )
            for x, y in sources
        ]
        errors = [build.communicate()[1] for build in builds]
        codes = [build.returncode for build in builds]
        assert 0 in codes, errors
        report = verify_database(target)
        assert report["ok"], (round_, report["problems"])
        assert _leftovers(target) == []


# --------------------------------------------------------------------------- bad input


def _good_images(root: Path) -> None:
    root.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(root / name), np.full((6, 5, 3), 70, np.uint8))
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    deep = root / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    cv2.imwrite(str(deep / ("f" * 120 + ".png")), np.zeros((4, 4, 3), np.uint8))


def _assert_refused(command: list[str], target: Path, expected: list[str]) -> None:
    """Run a build that must fail: exit 2, each expected fragment in the message, nothing written."""
    result = subprocess.run([*DATUMDB, *command, str(target)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "Traceback" not in result.stderr
    assert not target.exists() and _leftovers(target) == []


LONG_PATH = "d" * 200 + "/" + "e" * 200 + "/" + "f" * 120 + ".png"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a.png 0", "missing.png 1"], ["list.txt:2", "missing.png"]),
        (["a.png 0", "bad.png 1"], ["list.txt:2", "bad.png", "not an image"]),
        (["a.png cat"], ["list.txt:1", "'cat'", "not an integer"]),
        (["a.png 3000000000"], ["list.txt:1", "outside int32"]),
        (["a.png 0", "../a.png 1"], ["list.txt:2", "escapes ROOT"]),
        (["/etc/hostname 0"], ["list.txt:1", "absolute path"]),
        ([f"{LONG_PATH} 0"], ["list.txt:1", "511"]),
        (["a.png 0", ""], ["list.txt:2", "empty line"]),
    ],
)
def test_bad_imageset_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, lines: list[str], expected: list[str]
) -> None:
    _good_images(tmp_path / "images")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    target = tmp_path / "db"
    _assert_refused(["convert-imageset", str(tmp_path / "images"), str(tmp_path / "list.txt")], target, expected)


@pytest.mark.parametrize(
    ("images", "labels", "expected"),
    [
        (np.zeros(5, np.uint8), np.zeros(5, np.int64), ["X.npy", "(N, H, W)"]),
        (np.zeros((5, 2, 3, 3), np.complex64), np.zeros(5, np.int64), ["X.npy", "dtype complex64"]),
        (np.array([[[0.0]]] * 2 + [[[np.nan]]] + [[[0.0]]], np.float32), np.zeros(4, np.int64),
         ["X.npy", "image 2", "NaN"]),
        (np.zeros((3, 4, 4), np.uint8), np.array([0, 2**40, 1]), ["y.npy", "index 1", "outside int32"]),
        (np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.int64), ["y.npy", "2 labels for 3 images"]),
        (np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.float32), ["y.npy", "must be integers"]),
    ],
)  # fmt: skip
def test_bad_arrays_are_a_clear_error_and_write_nothing(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, expected: list[str]
) -> None:
    np.save(tmp_path / "X.npy", images)
    np.save(tmp_path / "y.npy", labels)
    target = tmp_path / "db"
    _assert_refused(["convert-arrays", str(tmp_path / "X.npy"), str(tmp_path / "y.npy")], target, expected)


def test_atheris_fuzzing_of_the_decoder_finds_no_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    fixtures = Path(__file__).parent / "fixtures" / "caffe"
    for name in ("lmdb_raw", "lmdb_gray", "lmdb_png", "lmdb_jpg"):
        with DatumReader(fixtures / name) as reader:
            for index, (_, value) in enumerate(reader.items()):
                (corpus / f"{name}-{index}").write_bytes(value)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fuzz" / "fuzz_codec.py"), "-runs=200000", "-max_len=8192",
         # 3 GB: one encoded image may legitimately decode to 3 bytes x the pixel bound (2^27 pixels,
         # ~400 MB, so a 100-megapixel photo passes), and a progressive JPEG header claiming that
         # many pixels makes libjpeg hold every DCT coefficient first (6-8 bytes a pixel: 0.8-1.1
         # GB; a 1 KB forged file reached 2.35 GB here). -seed: the same inputs on every CI run.
         "-rss_limit_mb=3072", "-seed=1", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 200000 runs" in result.stderr
