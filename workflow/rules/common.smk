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
from datumdb.pipeline import outputs
from datumdb.files import atomic_write
from datumdb.pipeline.assemble import NOT_ASSEMBLED, assembled_record
from datumdb.pipeline.config import SCHEMA_PATH, read_params, to_config, validate_params
from datumdb.pipeline.fingerprint import input_digest, stage_params_json
from datumdb.pipeline.outputs import MEAN_BINARYPROTO, MEAN_JSON, MEAN_NPY, SUMMARY, stale_outputs
from datumdb.pipeline.plan import INPUT_HASHES, load_hash_cache, make_plan, part_file, save_hash_cache, split_file, write_plan
from datumdb.pipeline.shards import stale_tasks
from datumdb.pipeline.splits import SPLITS
from datumdb.shardset import stray_shards

# PARAMS: the params file (workflow/rules/params.smk, which checked it before configfile:).
PLAN_DIR = Path(".snakemake/datumdb/plan")  # the plan's files: one per part, one per split
STALE_STAMPS = Path(".snakemake/datumdb/stamps")
# The jobs' declared outputs: receipts, never the shard sets or databases themselves. Snakemake
# deletes a job's outputs before running it (and after it fails), so a killed or failed job
# would lose them; datumdb replaces each shard, index and database whole by rename.
BUILT = Path(".snakemake/datumdb/done/build")  # per split: its database assembled (or the note)
INDEXED = Path(".snakemake/datumdb/done/index")  # per split: its shard set complete and indexed
SHARDS_BUILT = Path(".snakemake/datumdb/done/shards")  # per part: its shards current


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


def plan_or_exit(config_):
    """The plan, its files written where their content changed.

    Input files are hashed once, and not at all while their size, mtime and inode match the
    cache DVC's stages and the steps share (.datumdb/input-hashes.json).
    """
    cache = load_hash_cache()
    try:
        plan = make_plan(config_, cache)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")
    save_hash_cache(cache)
    write_plan(plan, PLAN_DIR)
    return plan


def mark_stale_outputs(config_, plan):
    """Make the jobs of stale outputs rerun: their output records another fingerprint.

    Snakemake's own records (.snakemake/metadata) catch a params change only where it ran
    before; a fresh clone after `dvc pull` has none. So every fingerprinted report has a stamp
    file among its job's inputs: written now when the report is stale (an input newer than the
    outputs makes Snakemake rerun the job), left old otherwise. The inputs that come from other
    jobs are ancient() (file times do not matter) unless the consuming output is stale, so a
    rerun upstream carries on downstream exactly when the fingerprints say it must.
    """
    try:
        stale = stale_outputs(config_, ".", plan=plan)
    except DatumDBError as exc:
        sys.exit(f"datumdb: {exc}")
    STALE_STAMPS.mkdir(parents=True, exist_ok=True)
    for path in stale:
        print(f"datumdb: {path} is stale ({stale[path][0]}); it will be remade", file=sys.stderr)
    for path in FINGERPRINTED:
        set_stamp(STALE_STAMPS / stamp_name(path), stale.get(path))
    return stale


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
    rerun = any(f in STALE for f in FINGERPRINTED) or any(
        f != SUMMARY for f in outputs.missing_outputs(assemble=CONFIG.build.assemble)
    )
    rerun = rerun or REBUILT  # a shards or assemble job runs: the verify jobs after it run again
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
    """After a successful run, record the outputs in DVC (``dvc commit --force``; with the DVC of
    Snakemake's environment, without its run cache: datumdb.pipeline.record), as ``make dataset``
    used to do alone: then ``dvc repro`` and ``dvc status`` see them as fresh.

    Only when that is true: in a DVC repository, on params.yaml (dvc.yaml's params file), with
    every output present and matching the params by its fingerprint, and the summary written
    after the reports it sums up (a run of some targets only can leave others stale). The dvc
    beside the Python running Snakemake is used, else the one on PATH; without one, a note.
    """
    if not Path(".dvc").is_dir() or Path(PARAMS).resolve() != Path("params.yaml").resolve():
        return
    missing = outputs.missing_outputs(assemble=CONFIG.build.assemble)
    stale = stale_outputs(CONFIG, ".", plan=PLAN) if not missing else {}
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
    # the digest of the files the plan was made from (it hashed each once): nothing is read again
    inputs = PLAN.inputs or input_digest(CONFIG, load_hash_cache())
    atomic_write(outputs.RESOLVED_PARAMS, stage_params_json(CONFIG, inputs))  # what the DVC stages read their params from
    print("datumdb: recording the outputs in DVC (dvc commit --force)", flush=True)
    if Path(dvc).parent == Path(sys.executable).parent:  # DVC here: its commit without the run cache
        command = [sys.executable, "-P", "-m", "datumdb.pipeline.record"]
    else:
        command = [dvc, "commit", "--force", "--quiet"]
    if subprocess.run(command, check=False).returncode != 0:
        print("datumdb: dvc commit failed; run it again by hand to record the outputs")


def built_receipt(split):
    """The receipt of split ``split``: its database assembled (or the note that it is not)."""
    return str(BUILT / f"{split}.done")


def index_receipt(split):
    """The receipt of split ``split``: its shard set holds the planned shards and is indexed."""
    return str(INDEXED / f"{split}.done")


def part_receipt(part):
    """The receipt of part ``part``: every shard of it current."""
    return str(SHARDS_BUILT / f"{part}.done")


def index_current(split, stale, stale_shards):
    """Whether the shard set of ``split`` is indexed as planned, without strays."""
    shard_set = outputs.shard_set(split)
    names = [task.name for task in PLAN.shards[split]]
    if f"{shard_set}/shards.json" in stale or not Path(f"{shard_set}/shards.json").is_file():
        return False
    # (a shard missing or stale: its part reruns first, then this split's index)
    return not stray_shards(shard_set, names) and not any((split, name) in stale_shards for name in names)


def database_current(split, stale):
    """Whether the database of ``split`` (or the note that it is not assembled) matches its shard set."""
    files = outputs.database_files(split, CONFIG.build.assemble)
    return all(Path(path).is_file() for path in files) and files[-1] not in stale


def reconcile_receipts(stale):
    """Make each receipt say whether what it stands for is there and current; whether a job
    that builds (shards or assemble) will run.

    Current (a fresh clone after `dvc pull`, or outputs DVC made): a missing receipt is written,
    so nothing reruns. Missing or stale: the receipt is removed, so its job reruns (and, through
    the stamps, what follows).
    """
    for folder in (SHARDS_BUILT, INDEXED, BUILT):
        folder.mkdir(parents=True, exist_ok=True)
    rebuilt = False
    planned = [task for split in SPLITS for task in PLAN.shards[split]]
    stale_shards = {(task.split, task.name) for task in stale_tasks(planned, outputs.SHARDS)}  # each read once
    for part in PARTS:
        receipt = Path(part_receipt(part))
        if any((task.split, task.name) in stale_shards for task in PLAN.part(part)):
            receipt.unlink(missing_ok=True)
            rebuilt = True
        elif not receipt.exists():
            receipt.write_text("found at start-up, matching the plan\n")
    for receipt in SHARDS_BUILT.glob("*.done"):  # parts that are no more
        if not receipt.stem.isdigit() or int(receipt.stem) not in PARTS:
            receipt.unlink(missing_ok=True)
    for split in SPLITS:
        indexed = index_current(split, stale, stale_shards)
        for receipt, current in (
            (Path(index_receipt(split)), indexed),
            (Path(built_receipt(split)), indexed and database_current(split, stale)),
        ):
            if not current:
                receipt.unlink(missing_ok=True)
                rebuilt = True
            elif not receipt.exists():
                receipt.write_text("found at start-up, matching the plan\n")
    return rebuilt


def shard_mem_mb(wildcards, attempt):
    """A shards job holds one shard's records a few times over (at most four times
    build.shard_size samples), plus ~400 MB of runtime. Doubles on each retry."""
    if CONFIG.dataset.source == "synthetic":
        sample = math.prod(CONFIG.dataset.shape)
    else:
        sample = 1 << 20  # a guess for image files: decoded photos can be larger than on disk
    return (400 + 3 * 4 * CONFIG.build.shard_size * sample // 2**20) * attempt


DATUMDB = datumdb_command()  # the rules' params.datumdb
CONFIG = load_config_or_exit()
FINGERPRINTED = [*(outputs.verify_details(split) for split in SPLITS), MEAN_JSON]
PARTS = list(range(CONFIG.partition.count))
PLAN = plan_or_exit(CONFIG)
STALE = mark_stale_outputs(CONFIG, PLAN)
REBUILT = reconcile_receipts(STALE)


onsuccess:
    record_in_dvc()
