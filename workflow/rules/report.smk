# verify each split's shard set against its source -> mean of train -> the summary report.
# The shard sets come in as their index receipts (dataset.smk): these jobs run beside the assembly. The outputs are update(): small
# files Snakemake keeps (and backs up) instead of deleting them before the job runs; each step
# replaces them by rename only once it succeeded, so a killed or failed job leaves the previous
# reports in place (Snakemake restores its backup after a failure).


rule verify:
    input:
        db=upstream(outputs.verify_details("{split}"), [index_receipt("{split}")]),
        train=upstream(outputs.verify_details("{split}"), [index_receipt("train")]),
        source=source_inputs(),
        stamp=stamp_of(outputs.verify_details("{split}")),
    output:
        details=update(report(
            outputs.verify_details("{split}"),
            caption="../report/verify_metrics.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "report"},
        )),
        metrics=update(outputs.metrics("{split}")),
        histogram=update(report(
            outputs.histogram("{split}"),
            caption="../report/label_histogram.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "label histogram"},
        )),
        sheet=update(report(
            outputs.sheet("{split}"),
            caption="../report/contact_sheet.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "contact sheet"},
        )),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        db=lambda wildcards: outputs.shard_set(wildcards.split),
        train=outputs.shard_set("train"),
        plan=str(PLAN_DIR),  # the plan made at start-up: verify need not plan again
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/verify/{split}.tsv"
    log:
        "logs/verify/{split}.log",
    wildcard_constraints:
        split="|".join(SPLITS),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "{params.datumdb} --no-progress pipeline verify --params {params.params_file:q} --split {wildcards.split}"
        " {params.db:q} --train-db {params.train:q} --details {output.details:q} --metrics {output.metrics:q}"
        " --histogram {output.histogram:q} --sheet {output.sheet:q} --plan {params.plan:q} > {log:q} 2>&1"


rule mean:
    input:
        db=upstream(MEAN_JSON, [index_receipt("train")]),
        stamp=stamp_of(MEAN_JSON),
    output:
        binaryproto=update(MEAN_BINARYPROTO),
        npy=update(MEAN_NPY),
        json=update(report(
            MEAN_JSON,
            caption="../report/mean.rst",
            category="Mean",
            labels={"figure": "per-channel mean"},
        )),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        db=outputs.shard_set("train"),
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/mean/train.tsv"
    log:
        "logs/mean/mean.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "{params.datumdb} --no-progress pipeline mean --params {params.params_file:q} {params.db:q}"
        " --binaryproto {output.binaryproto:q} --npy {output.npy:q} --json {output.json:q} > {log:q} 2>&1"


rule report:
    input:
        details=report_inputs([outputs.verify_details(split) for split in SPLITS]),
        mean=report_inputs([MEAN_JSON]),
    output:
        summary=update(report(
            SUMMARY,
            caption="../report/summary.rst",
            category="Summary",
            labels={"figure": "summary"},
        )),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
    benchmark:  # wall time, peak RSS, I/O of each job (Snakemake measures it)
        "logs/benchmarks/report/summary.tsv"
    log:
        "logs/report/report.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{params.datumdb} --no-progress pipeline report --params {params.params_file:q} {input.details:q}"
        " --mean {input.mean:q} --output {output.summary:q} > {log:q} 2>&1"
