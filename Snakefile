# datumdb pipeline: params.yaml -> records (per shard) -> one LMDB per split -> verify, mean -> report.
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
        # every output file (a job reruns for a missing one only if it is asked for), the
        # databases as their builds' receipts (a receipt goes when a database file does)
        [path for path in outputs.output_files() if not path.startswith(f"{outputs.DATABASES}/")],
        [built_receipt(split) for split in SPLITS],
