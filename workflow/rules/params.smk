# The params file, checked before Snakemake reads it (the Snakefile includes this before its
# `configfile:`). Snakemake's own reading runs no check of ours: it expands YAML aliases without
# bound and merges every mapping (a 3 kB "billion laughs" file is a billion values, a hang), fails
# with a traceback on an integer of over 4300 digits, and evaluates yte templates. datumdb's reading
# (datumdb.pipeline.config.load_config) refuses all of these, and every other bad value, in
# milliseconds: one line naming the file and the key, exit 2, before any job.
# (A file given with --configfile is read by Snakemake before any Snakefile runs; it is checked
# here too, but only after that reading.)
import os
import sys

from datumdb.errors import DatumDBError
from datumdb.pipeline.config import load_config, read_params

DEFAULT_PARAMS = "params.yaml"  # the Snakefile's configfile
# The steps read their values from this file themselves (one argument, never a shell string).
PARAMS = (workflow.overwrite_configfiles or [DEFAULT_PARAMS])[-1]


def check_params_or_exit():
    """Exit 2 with one line if the params file (or params.yaml, which configfile: reads too) is bad."""
    try:
        load_config(PARAMS)
        if os.path.exists(DEFAULT_PARAMS) and not os.path.samefile(DEFAULT_PARAMS, PARAMS):
            read_params(DEFAULT_PARAMS)  # configfile: merges it in before the --configfile values
    except DatumDBError as exc:
        print(f"datumdb: {exc}", file=sys.stderr)
        sys.exit(2)


check_params_or_exit()
