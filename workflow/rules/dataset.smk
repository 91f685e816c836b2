# records (one job per shard, temp) -> build one LMDB per split (its only writer).
# Every step reads params.yaml itself (`--params`): no value is joined into a shell command.
# Inputs are ancient(): reruns follow fingerprints (common.smk), not file times.


rule records:
    input:
        source_inputs(),
    output:
        records=temp([str(records_path(RECORDS, "{shard}", split)) for split in SPLITS]),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        records=lambda wildcards, output: Path(output.records[0]).parents[1],
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/records/{shard}.tsv"
    log:
        "logs/records/{shard}.log",
    wildcard_constraints:
        shard=r"\d+",
    threads: 1
    resources:
        mem_mb=shard_mem_mb,
        runtime=15,
    shell:
        "{params.datumdb} --no-progress pipeline records --params {params.params_file:q} --shard {wildcards.shard}"
        " {params.records:q} > {log:q} 2>&1"


rule build:
    input:
        records=[str(records_path(RECORDS, shard, "{split}")) for shard in SHARDS],
        stamp=stamp_of(database_files("{split}")[1]),
    output:
        mdb=database_files("{split}")[0],
        manifest=database_files("{split}")[1],
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        records=lambda wildcards, input: Path(input.records[0]).parents[1],
        db=lambda wildcards, output: Path(output.manifest).parent,
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/build/{split}.tsv"
    log:
        "logs/build/{split}.log",
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "{params.datumdb} --no-progress pipeline build --params {params.params_file:q} --split {wildcards.split}"
        " {params.records:q} {params.db:q} > {log:q} 2>&1"
