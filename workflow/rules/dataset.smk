# shards (one job per part of the plan) -> index (per split: the shard set's index, once all its
# parts are built) -> assemble (per split: its one Caffe database). Verify and mean read the shard
# sets, so they start once a split is indexed, beside its assembly. The plan is made when Snakemake
# starts (common.smk): each part's plan file lists its shards and their members, and a part's job
# builds only the shards whose manifest records another fingerprint, so a run's work follows what
# changed.
# Every step reads params.yaml itself (`--params`): no value is joined into a shell command.
# Jobs declare receipts (.snakemake/datumdb/done/...), not the shard sets or databases:
# Snakemake deletes a job's outputs before it runs and after it fails; the steps replace each
# shard, index and database whole by rename themselves, so a killed or failed job loses nothing.
# Receipts go (and the job reruns) when what they stand for is missing or stale (common.smk).


rule shards:
    input:
        part=ancient(str(part_file(PLAN_DIR, "{part}"))),
    output:
        receipt=touch(part_receipt("{part}")),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        shards=outputs.SHARDS,
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/shards/{part}.tsv"
    log:
        "logs/shards/{part}.log",
    wildcard_constraints:
        part=r"\d+",
    threads: 1
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    shell:
        "{params.datumdb} --no-progress pipeline shards --params {params.params_file:q} --part {input.part:q}"
        " --jobs {threads} {params.shards:q} > {log:q} 2>&1"


rule index:
    input:
        parts=ancient([part_receipt(part) for part in PARTS]),
        plan=ancient(str(split_file(PLAN_DIR, "{split}"))),
    output:
        # Snakemake writes the receipt once the step succeeded (the index in place then)
        receipt=touch(index_receipt("{split}")),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        shard_set=lambda wildcards: outputs.shard_set(wildcards.split),
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/index/{split}.tsv"
    log:
        "logs/index/{split}.log",
    wildcard_constraints:
        split="|".join(SPLITS),
    # first of the jobs a part's end makes ready: assemble, verify and mean of its split wait for it
    priority: 2
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    shell:
        "{params.datumdb} --no-progress pipeline index --params {params.params_file:q} --split {wildcards.split}"
        " --split-plan {input.plan:q} {params.shard_set:q} > {log:q} 2>&1"


rule assemble:
    input:
        indexed=ancient(index_receipt("{split}")),
    output:
        # Snakemake writes the receipt once the step succeeded (the database in place then)
        receipt=touch(built_receipt("{split}")),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        shard_set=lambda wildcards: outputs.shard_set(wildcards.split),
        db=lambda wildcards: outputs.database(wildcards.split),
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/assemble/{split}.tsv"
    log:
        "logs/assemble/{split}.log",
    wildcard_constraints:
        split="|".join(SPLITS),
    # then the assemblies, before verify and mean: the longest job (train's) starts early, and a run
    # killed meanwhile leaves the previous reports as they were
    priority: 1
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "{params.datumdb} --no-progress pipeline assemble --params {params.params_file:q} --split {wildcards.split}"
        " {params.shard_set:q} {params.db:q} > {log:q} 2>&1"
