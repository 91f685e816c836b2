# generate shards -> serialize shards (parallel) -> build one LMDB per split (single writer each).


rule generate:
    input:
        code=DATUMDB_CODE,
        source=source_inputs(),
    output:
        images="data/shards/{shard}/images.npy",
        labels="data/shards/{shard}/labels.npy",
        meta="data/shards/{shard}/meta.json",
    params:
        folder=lambda wildcards, output: Path(output.meta).parent,
        dataset=dvc_args(config["dataset"]),
        seed=config["seed"],
        partition=dvc_args(config["partition"]),
    log:
        "logs/generate/{shard}.log",
    wildcard_constraints:
        shard=r"\d+",
    threads: 1
    resources:
        mem_mb=shard_mem_mb,
        runtime=15,
    shell:
        "datumdb --no-progress generate-shard {params.dataset} --seed {params.seed} {params.partition}"
        " --shard {wildcards.shard} {params.folder} > {log} 2>&1"


rule serialize:
    input:
        code=DATUMDB_CODE,
        shard=rules.generate.output,
    output:
        records=expand("data/records/{{shard}}/{split}.rec", split=SPLITS),
    params:
        shard=lambda wildcards, input: Path(input.shard[0]).parent,
        folder=lambda wildcards, output: Path(output.records[0]).parent,
        split=split_args(),
        encoding=config["encoding"],
    log:
        "logs/serialize/{shard}.log",
    wildcard_constraints:
        shard=r"\d+",
    threads: 1
    resources:
        mem_mb=shard_mem_mb,
        runtime=15,
    shell:
        "datumdb --no-progress serialize-shard {params.shard} {params.folder} {params.split}"
        " --encoding {params.encoding} > {log} 2>&1"


rule build:
    input:
        code=DATUMDB_CODE,
        records=expand("data/records/{shard}/{{split}}.rec", shard=shard_ids()),
    output:
        mdb="data/lmdb/{split}/data.mdb",
        manifest="data/lmdb/{split}/datumdb.json",
    params:
        records=lambda wildcards, input: Path(input.records[0]).parent.parent,
        db=lambda wildcards, output: Path(output.mdb).parent,
        partition=dvc_args(config["partition"]),
        batch_size=config["build"]["batch_size"],
        map_size=config["build"]["map_size"],
    log:
        "logs/build/{split}.log",
    wildcard_constraints:
        split="train|val|test",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "datumdb --no-progress build-split {params.records} {params.db} --split {wildcards.split}"
        " {params.partition} --batch-size {params.batch_size} --map-size {params.map_size} --overwrite > {log} 2>&1"
