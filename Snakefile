# datumdb pipeline: params.yaml -> shards -> one LMDB per split -> verify, mean -> report.
# The same stages, with the same `datumdb` commands, are in dvc.yaml; see README "Pipeline".
from snakemake.utils import min_version

min_version("8.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "reports/summary.md",
        "data/mean/mean.binaryproto",
        "data/mean/mean.npy",
        expand("reports/verify/{split}_samples.png", split=SPLITS),
