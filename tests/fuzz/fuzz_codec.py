"""Coverage-guided fuzzing of the Datum decoder with atheris (libFuzzer).

    python tests/fuzz/fuzz_codec.py -runs=50000 -max_len=4096

Every input is decoded and turned into an array; anything but a clean DatumError is a crash.
Seeds: the real Caffe fixture records, so the fuzzer starts from valid Datums.
tests/test_reliability.py runs it for a bounded number of inputs.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from datumdb.codec import datum_to_array, decode
    from datumdb.errors import DatumError


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(DatumError):
        datum_to_array(decode(data, b"fuzz"), key=b"fuzz")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
