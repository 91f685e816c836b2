# verify each split against the raw shards -> mean of train -> the summary report.


rule verify:
    input:
        code=DATUMDB_CODE,
        db=rules.build.output,
        train=expand(rules.build.output, split="train"),
        shards=expand(rules.generate.output, shard=shard_ids()),
    output:
        metrics=report(
            "reports/verify/{split}.json",
            caption="../report/verify_metrics.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "metrics"},
        ),
        histogram=report(
            "reports/verify/{split}_labels.csv",
            caption="../report/label_histogram.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "label histogram"},
        ),
        sheet=report(
            "reports/verify/{split}_samples.png",
            caption="../report/contact_sheet.rst",
            category="Verification",
            labels={"split": "{split}", "figure": "contact sheet"},
        ),
    params:
        db=lambda wildcards, input: Path(input.db[0]).parent,
        train=lambda wildcards, input: Path(input.train[0]).parent,
        shards=lambda wildcards, input: Path(input.shards[0]).parent.parent,
        partition=dvc_args(config["partition"]),
        split=split_args(),
        sample=config["verify"]["sample"],
    log:
        "logs/verify/{split}.log",
    wildcard_constraints:
        split="train|val|test",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "datumdb --no-progress verify-split {params.db} --split {wildcards.split} --shard-dir {params.shards}"
        " {params.partition} --train-db {params.train} {params.split} --sample {params.sample}"
        " --metrics {output.metrics} --histogram {output.histogram} --contact-sheet {output.sheet} > {log} 2>&1"


rule mean:
    input:
        code=DATUMDB_CODE,
        db=expand(rules.build.output, split="train"),
    output:
        binaryproto="data/mean/mean.binaryproto",
        npy="data/mean/mean.npy",
        json=report(
            "reports/mean.json",
            caption="../report/mean.rst",
            category="Mean",
            labels={"figure": "per-channel mean"},
        ),
    params:
        db=lambda wildcards, input: Path(input.db[0]).parent,
    log:
        "logs/mean/mean.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "datumdb --no-progress compute-mean {params.db} {output.binaryproto} --npy {output.npy}"
        " --json {output.json} > {log} 2>&1"


rule report:
    input:
        code=DATUMDB_CODE,
        metrics=expand("reports/verify/{split}.json", split=SPLITS),
        mean="reports/mean.json",
    output:
        summary=report(
            "reports/summary.md",
            caption="../report/summary.rst",
            category="Summary",
            labels={"figure": "summary"},
        ),
    log:
        "logs/report/report.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "datumdb --no-progress report {input.metrics} --mean {input.mean} --output {output.summary} > {log} 2>&1"
