# Helpers of the rules: validation of params.yaml and the command-line arguments of each step.
# The arguments are spelled exactly as DVC's `${...}` interpolation spells them in dvc.yaml, so
# both orchestrators run identical commands and produce identical bytes.
import math
from pathlib import Path

from snakemake.utils import validate


SPLITS = ["train", "val", "test"]


def check_params(config):
    """What a JSON schema cannot say; each problem names the parameter (or file) at fault."""
    shards = config["partition"]["shards"]
    if shards != list(range(len(shards))):
        raise ValueError(
            f"params.yaml: partition.shards must be the ids 0, 1, ..., n-1 in order, got {shards}"
        )
    split = config["split"]
    total = split["train"] + split["val"] + split["test"]
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(
            f"params.yaml: split.train + split.val + split.test must be 1, got "
            f"{split['train']} + {split['val']} + {split['test']} = {total:g}"
        )
    dataset = config["dataset"]
    if dataset["source"] == "synthetic":
        count = dataset["count"]
        for name in SPLITS:
            if round(count * split[name]) < 1:
                raise ValueError(f"params.yaml: split.{name}={split[name]} of dataset.count={count} is empty")
        if count < len(shards):
            raise ValueError(f"params.yaml: dataset.count={count} is smaller than the {len(shards)} shards")
    missing = [path for path in source_inputs() if not Path(path).exists()]
    if missing:
        raise ValueError(
            f"params.yaml: dataset.source={dataset['source']} needs these input files, which do not exist: "
            + ", ".join(missing)
        )


def source_inputs():
    """The local input files of the chosen source (nothing for synthetic)."""
    dataset = config["dataset"]
    source = dataset["source"]
    folder = Path(dataset["input_dir"])
    if source == "arrays":
        names = [dataset["arrays"]["images"], dataset["arrays"]["labels"]]
    elif source == "imageset":
        names = [dataset["imageset"]["list_file"], dataset["imageset"]["root"]]
    elif source == "cifar10":
        names = list(dataset["cifar10"]["batches"])
    elif source == "mnist":
        names = [dataset["mnist"]["images"], dataset["mnist"]["labels"]]
    else:
        names = []
    return [str(folder / name) for name in names]


def dvc_args(group, prefix=""):
    """A params group as DVC's dictionary unpacking writes it: --key value, --flag, --list a b."""
    words = []
    for key, value in group.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            words += dvc_args(value, prefix=f"{name}.").split()
        elif isinstance(value, bool):
            if value:
                words.append(f"--{name}")
        elif isinstance(value, list):
            if value:
                words += [f"--{name}", *map(str, value)]
        else:
            words += [f"--{name}", str(value)]
    return " ".join(words)


def split_args():
    split = config["split"]
    return f"--seed {config['seed']} --train {split['train']} --val {split['val']} --test {split['test']}"


def shard_ids():
    return config["partition"]["shards"]


def shard_mem_mb(wildcards, attempt):
    """A shard's raw images held about three times (read, arrays, encoded) plus ~400 MB of runtime.

    The dataset's bytes: count x shape for synthetic data, the input files' size for arrays,
    cifar10 and mnist, and a 2 GiB guess for an image list (compressed files decode larger).
    Doubles on each retry.
    """
    dataset = config["dataset"]
    if dataset["source"] == "synthetic":
        total = dataset["count"] * math.prod(dataset["shape"])
    elif dataset["source"] == "imageset":
        total = 2 * 2**30
    else:
        total = sum(Path(f).stat().st_size for f in source_inputs() if Path(f).is_file())
    return (400 + 3 * total // len(shard_ids()) // 2**20) * attempt


DATUMDB_CODE = sorted(str(p) for p in Path("src/datumdb").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


validate(config, schema="../schemas/params.schema.yaml")
check_params(config)
