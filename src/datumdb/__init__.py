"""datumdb: reproducible, Caffe-exact LMDB datasets of ``Datum`` records.

The library: an exact Datum codec (:mod:`datumdb.codec`), a batched, atomic, deterministic LMDB
writer (:mod:`datumdb.writer`), a lock-free read-only reader (:mod:`datumdb.reader`) that also
reads a split stored as shards (:mod:`datumdb.shardset`) as one sequence, Caffe tool
parity (:mod:`datumdb.imageset`, :mod:`datumdb.mean`) and verification (:mod:`datumdb.verify`).
"""

# The one home of the version (pyproject.toml reads it from here): a constant, because asking
# importlib.metadata costs 35 ms at every start of every pipeline job.
__version__ = "0.1.0"

from datumdb.errors import (
    DatabaseChangedError,
    DatabaseError,
    DatabaseExistsError,
    DatabaseNotFoundError,
    DatumDBError,
    DatumError,
    InputError,
    VerificationError,
    WriteError,
)
from datumdb.reader import DatumReader
from datumdb.shardset import ShardSetReader  # (importing it makes DatumReader open shard sets)
from datumdb.writer import DatabaseWriter

__all__ = [
    "DatabaseChangedError",
    "DatabaseError",
    "DatabaseExistsError",
    "DatabaseNotFoundError",
    "DatabaseWriter",
    "DatumDBError",
    "DatumError",
    "DatumReader",
    "InputError",
    "ShardSetReader",
    "VerificationError",
    "WriteError",
    "__version__",
]
