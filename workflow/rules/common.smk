# Helpers of the rules (no rules here): the params file, its validation, the output paths and
# the fingerprints that keep every output fresh.
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from snakemake.utils import validate

from datumdb.errors import DatumDBError
from datumdb.manifest import DATA_NAME, MANIFEST_NAME
from datumdb.pipeline import outputs
from datumdb.pipeline.build import READ_CHUNK, records_path
from datumdb.files import atomic_write
from datumdb.pipeline.config import SCHEMA_PATH, read_params, resolved_json, to_config, validate_params
from datumdb.pipeline.fingerprint import input_digest
from datumdb.pipeline.outputs import MEAN_BINARYPROTO, MEAN_JSON, MEAN_NPY, RECORDS, SUMMARY, stale_outputs, stale_records
from datumdb.pipeline.splits import SPLITS

# PARAMS: the params file (workflow/rules/params.smk, which checked it before configfile:).
INPUT_HASHES = Path(".snakemake/datumdb/input-hashes.json")  # stat-keyed cache of input file hashes
STALE_STAMPS = Path(".snakemake/datumdb/stamps")
# The build jobs' declared outputs: one receipt per split, never the database itself. Snakemake
# deletes a job's outputs before running it (and after it fails), so a killed or failed build
# would lose the previous database; datumdb's writer replaces a database whole by rename.
BUILT = Path(".snakemake/datumdb/done/build")


def beside_python(name):
    """The command ``name`` beside the Python running Snakemake (its environment), else on PATH;
    None if neither has it."""
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) and beside.is_file() else shutil.which(name)


def datumdb_command():
    """How the rules call datumdb, quoted for the shell: never assumed to be on PATH.

    ``$DATUMDB_COMMAND`` if set, else the console script beside the Python that runs Snakemake
    (``.venv/bin/snakemake`` from a shell without the venv activated finds ``.venv/bin/datumdb``),
    else ``datumdb`` on PATH. Found nowhere: the run stops here, before any job deletes an output.
    (Not ``python -m datumdb``: ``-m`` puts the working directory first on ``sys.path``.)
    """
    chosen = os.environ.get("DATUMDB_COMMAND") or beside_python("datumdb")
    if not chosen:
        sys.exit(
            f"datumdb: command not found: not beside {sys.executable} (the Python running Snakemake) nor on "
            "PATH; run 'make dataset' (creates .venv) or install \"datumdb[workflow]\" where Snakemake is installed"
        )
    return shlex.quote(chosen)


def load_config_or_exit():
    """The typed config; bad params stop the run before any job, naming the key."""
    try:
        raw = read_params(PARAMS)  # first: YAML 1.1 and 1.2 read every value alike
        # then the schema, plus what it cannot say: one line naming the key (Snakemake's own
        # validate, which fills the defaults into `config`, prints the whole schema)
        from_file = validate_params(raw, str(PARAMS))
        validate(config, schema=str(SCHEMA_PATH))
        if validate_params(config, str(PARAMS)) != from_file:
            raise DatumDBError(
                f"{PARAMS}: Snakemake's config differs from the file (--config or several config files?); "
                "the steps read the file, so give every parameter there (or pass another file with --configfile)"
            )
        return to_config(from_file)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")


def hash_inputs(config_):
    """The input files' digest, re-hashing only files whose size, mtime or inode changed."""
    try:
        cache = json.loads(INPUT_HASHES.read_text()) if INPUT_HASHES.exists() else {}
    except ValueError:
        cache = {}
    try:
        digest = input_digest(config_, cache)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")
    INPUT_HASHES.parent.mkdir(parents=True, exist_ok=True)
    INPUT_HASHES.write_text(json.dumps(cache))
    return digest


def mark_stale_outputs(config_, inputs):
    """Make the jobs of stale outputs rerun: their output records another fingerprint.

    Snakemake's own records (.snakemake/metadata) catch a params change only where it ran
    before; a fresh clone after `dvc pull` has none. So every fingerprinted output has a stamp
    file among its job's inputs: written now when the output is stale (an input newer than the
    outputs makes Snakemake rerun the job), left old otherwise. The inputs that come from other
    jobs are ancient() (file times do not matter) unless the consuming output is stale, so a
    rerun upstream carries on downstream exactly when the fingerprints say it must.
    """
    try:
        stale = stale_outputs(config_, ".", inputs=inputs)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")
    STALE_STAMPS.mkdir(parents=True, exist_ok=True)
    for path in FINGERPRINTED:
        if path in stale:
            print(f"datumdb: {path} is stale ({stale[path][0]}); it will be remade", file=sys.stderr)
        set_stamp(STALE_STAMPS / stamp_name(path), stale.get(path))
    return stale


def mark_stale_records(config_, inputs):
    """Make the records jobs of stale record files rerun (a stamp among their inputs, as above).

    A run killed (or failed) after its records jobs leaves their temp() files; after a param
    change the build would refuse them, and Snakemake, which sees complete files, would not
    remake them.
    """
    try:
        stale = stale_records(config_, RECORDS, inputs=inputs)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")
    for shard in range(config_.partition.count):
        if shard in stale:
            print(f"datumdb: {stale[shard]}; shard {shard}'s records will be remade", file=sys.stderr)
        set_stamp(STALE_STAMPS / f"records__{shard}.stamp", [stale[shard]] if shard in stale else None)


def set_stamp(stamp, reasons):
    """Write ``stamp`` now (its job reruns) for ``reasons``; without reasons, leave it old."""
    if reasons:
        stamp.write_text(f"{time.time_ns()} {'; '.join(reasons)}\n")
    else:  # fresh (again): a stamp older than any output triggers nothing
        if not stamp.exists() or stamp.read_text() != "fresh\n":
            stamp.write_text("fresh\n")
        os.utime(stamp, ns=(0, 0))


def stamp_name(path):
    return "__".join(Path(path).parts) + ".stamp"


def records_stamp(wildcards):
    """An input function: the stamp of the records job of shard ``wildcards.shard``."""
    return str(STALE_STAMPS / f"records__{wildcards.shard}.stamp")


def stamp_of(pattern):
    """An input function: the stamp file of the job's fingerprinted output ``pattern``."""
    return lambda wildcards: str(STALE_STAMPS / stamp_name(pattern.format(**wildcards)))


def upstream(pattern, files):
    """An input function: ``files`` (from other jobs), ancient() unless output ``pattern`` is stale."""

    def inputs(wildcards):
        expanded = [f.format(**wildcards) for f in files]
        return expanded if pattern.format(**wildcards) in STALE else ancient(expanded)

    return inputs


def report_inputs(files):
    """The report's inputs: ancient() unless a job before it reruns: one of the reports it
    summarises is stale, or an output (of a build, verify or mean) is missing. (An ancient input
    that exists stops Snakemake's "updated by another job" from reaching the report.)"""
    rerun = any(f in STALE for f in FINGERPRINTED[3:]) or any(f != SUMMARY for f in outputs.missing_outputs())
    return files if rerun else ancient(files)


def source_inputs():
    """The files and folders the chosen source reads (listed so a missing one is a clear error)."""
    dataset = CONFIG.dataset
    folder = Path(dataset.input_dir)
    names = {
        "synthetic": [],
        "arrays": [dataset.arrays.images, dataset.arrays.labels],
        "imageset": ([dataset.imageset.list_file] if dataset.imageset.layout == "list" else [])
        + [dataset.imageset.root],
        "cifar10": list(dataset.cifar10.batches),
        "mnist": [dataset.mnist.images, dataset.mnist.labels],
    }[dataset.source]
    return [ancient(str(folder / name)) for name in names]


def record_in_dvc():
    """After a successful run, record the outputs in DVC (``dvc commit --force``), as ``make
    dataset`` used to do alone: then ``dvc repro`` and ``dvc status`` see them as fresh.

    Only when that is true: in a DVC repository, on params.yaml (dvc.yaml's params file), with
    every output present and matching the params by its fingerprint, and the summary written
    after the reports it sums up (a run of some targets only can leave others stale). The dvc
    beside the Python running Snakemake is used, else the one on PATH; without one, a note.
    """
    if not Path(".dvc").is_dir() or Path(PARAMS).resolve() != Path("params.yaml").resolve():
        return
    missing = outputs.missing_outputs()
    stale = stale_outputs(CONFIG, ".", inputs=INPUTS) if not missing else {}
    if missing or stale:
        print(f"datumdb: outputs not recorded in DVC, some are missing or stale: {(missing or list(stale))[0]}")
        return
    summed = [MEAN_JSON, *(outputs.verify_details(split) for split in SPLITS)]
    if Path(SUMMARY).stat().st_mtime_ns < max(Path(path).stat().st_mtime_ns for path in summed):
        print(f"datumdb: outputs not recorded in DVC: {SUMMARY} is older than the reports")
        return
    dvc = beside_python("dvc")
    if dvc is None:
        print("datumdb: outputs not recorded in DVC: no dvc beside Snakemake's Python nor on PATH")
        return
    atomic_write(outputs.RESOLVED_PARAMS, resolved_json(CONFIG, INPUTS))  # what the DVC stages read their params from
    print("datumdb: recording the outputs in DVC (dvc commit --force)", flush=True)
    if subprocess.run([dvc, "commit", "--force", "--quiet"], check=False).returncode != 0:
        print("datumdb: dvc commit failed; run it again by hand to record the outputs")


def built_receipt(split):
    """The receipt of split ``split``'s database: the build job's output, the consumers' input."""
    return str(BUILT / f"{split}.done")


def reconcile_receipts(stale):
    """Make each split's receipt say whether its database is there and fresh.

    Both files present and the manifest's fingerprint matching: a missing receipt is written (a
    fresh clone after `dvc pull`, or a database DVC made), so nothing reruns. A file missing: the
    receipt is removed, so its build reruns (and what follows). Present but stale: the stamp
    (mark_stale_outputs) reruns the build; no receipt is written for it.
    """
    BUILT.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        receipt = Path(built_receipt(split))
        files = database_files(split)
        if not all(Path(path).is_file() for path in files):
            receipt.unlink(missing_ok=True)
        elif not receipt.exists() and files[1] not in stale:
            receipt.write_text("found at start-up, matching the params\n")


def database_files(split):
    """The files of a split's database folder (declared as files: directory() outputs get a marker)."""
    folder = outputs.database(split)
    return [f"{folder}/{DATA_NAME}", f"{folder}/{MANIFEST_NAME}"]


def shard_mem_mb(wildcards, attempt):
    """A records job holds one read chunk of samples a few times over, plus ~400 MB of runtime.

    The chunk's bytes: READ_CHUNK samples of the synthetic shape, or a 256 MB guess for files
    (decoded images can be larger than on disk). Doubles on each retry.
    """
    if CONFIG.dataset.source == "synthetic":
        chunk = READ_CHUNK * math.prod(CONFIG.dataset.shape)
    else:
        chunk = 256 * 2**20
    return (400 + 3 * chunk // 2**20) * attempt


DATUMDB = datumdb_command()  # the rules' params.datumdb
CONFIG = load_config_or_exit()
FINGERPRINTED = [
    *(f"{outputs.database(split)}/{MANIFEST_NAME}" for split in SPLITS),
    *(outputs.verify_details(split) for split in SPLITS),
    MEAN_JSON,
]
SHARDS = list(range(CONFIG.partition.count))
INPUTS = hash_inputs(CONFIG)
STALE = mark_stale_outputs(CONFIG, INPUTS)
mark_stale_records(CONFIG, INPUTS)
reconcile_receipts(STALE)


onsuccess:
    record_in_dvc()
