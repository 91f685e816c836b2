# records (one job per shard, temp) -> build one LMDB per split (its only writer).
# Every step reads params.yaml itself (`--params`): no value is joined into a shell command.
# Inputs are ancient(): reruns follow fingerprints (common.smk), not file times.
# A build declares a receipt (.snakemake/datumdb/done/build/{split}.done), not the database:
# Snakemake deletes a job's outputs before it runs and after it fails, and the step replaces the
# database whole by rename itself, so a killed or failed build leaves the previous one in place.


rule records:
    input:
        source=source_inputs(),
        stamp=records_stamp,
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
        # Snakemake writes the receipt once the step succeeded (the database is in place then)
        receipt=touch(built_receipt("{split}")),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        records=lambda wildcards, input: Path(input.records[0]).parents[1],
        db=lambda wildcards: outputs.database(wildcards.split),
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
