# verify each split against its source -> mean of train -> the summary report.


rule verify:
    input:
        db=upstream(outputs.verify_details("{split}"), database_files("{split}")),
        train=upstream(outputs.verify_details("{split}"), database_files("train")),
        source=source_inputs(),
        stamp=stamp_of(outputs.verify_details("{split}")),
    output:
        details=report(
            outputs.verify_details("{split}"),
            caption="../report/verify_metrics.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "report"},
        ),
        metrics=outputs.metrics("{split}"),
        histogram=report(
            outputs.histogram("{split}"),
            caption="../report/label_histogram.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "label histogram"},
        ),
        sheet=report(
            outputs.sheet("{split}"),
            caption="../report/contact_sheet.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "contact sheet"},
        ),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        db=lambda wildcards, input: Path(input.db[0]).parent,
        train=lambda wildcards, input: Path(input.train[0]).parent,
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
        " --histogram {output.histogram:q} --sheet {output.sheet:q} > {log:q} 2>&1"


rule mean:
    input:
        db=upstream(MEAN_JSON, database_files("train")),
        stamp=stamp_of(MEAN_JSON),
    output:
        binaryproto=MEAN_BINARYPROTO,
        npy=MEAN_NPY,
        json=report(
            MEAN_JSON,
            caption="../report/mean.rst",
            category="Mean",
            labels={"figure": "per-channel mean"},
        ),
    params:
        datumdb=DATUMDB,  # quoted for the shell already
        params_file=PARAMS,
        db=lambda wildcards, input: Path(input.db[0]).parent,
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
        summary=report(
            SUMMARY,
            caption="../report/summary.rst",
            category="Summary",
            labels={"figure": "summary"},
        ),
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
