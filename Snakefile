# datumdb pipeline: params.yaml -> plan -> shards (per part) -> a shard set and one assembled LMDB per split
# -> verify, mean -> report.
# The same steps run under DVC (dvc.yaml); both call `datumdb pipeline STEP --params params.yaml`,
# so they write the same bytes. Defaults and options for users: profiles/default/config.yaml.
from snakemake.utils import min_version

min_version("9.0")


# First: datumdb's check of the params file, before Snakemake reads it (see params.smk).
include: "workflow/rules/params.smk"


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        # every report file (a job reruns for a missing one only if it is asked for); the shard
        # sets and databases as their jobs' receipts (a receipt goes when what it stands for does)
        [path for path in outputs.output_files() if path.startswith("reports/") or path.startswith("data/mean/")],
        [built_receipt(split) for split in SPLITS],
