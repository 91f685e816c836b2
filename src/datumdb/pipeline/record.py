"""Recording a Snakemake run's outputs in DVC: ``dvc commit --force`` without the run cache.

After a Snakemake run, DVC must see the outputs as its own (``dvc status`` clean, ``dvc repro``
with nothing to do, ``dvc push`` sharing them). ``dvc commit --force`` does that, and also offers
each stage to DVC's run cache, which hashes the stage's dependencies a second time (for the params
stage: every input file) before it declines: every output here is ``persist: true``, and the run
cache never keeps a stage with a persistent output. That second walk was a third of the commit at
20 000 photos (1.0 of 2.9 s), paid again by every run however small its change.

Everything else is DVC's own ``commit`` (its lock, hashes, cache links and dvc.lock). It runs in
the environment that has DVC, as ``python -P -m datumdb.pipeline.record`` (``-P``: not the working
directory first on ``sys.path``); the Snakefile falls back to ``dvc commit --force`` when DVC lives
elsewhere.
"""

from __future__ import annotations

import logging
import sys


def commit_outputs(root: str = ".") -> None:
    """``dvc commit --force`` of every stage of the repository at ``root``, skipping the run
    cache (which would decline each stage after hashing its dependencies again)."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        repo.stage_cache.save = _declined
        repo.commit(force=True)


def _declined(stage: object) -> None:
    """The run cache's answer to a stage whose outputs persist, without hashing anything."""


def main() -> int:
    """Commit, with DVC's warnings quiet as ``--quiet`` makes them; one line on failure."""
    try:
        import dvc  # noqa: F401 (importing DVC sets up its logging, at INFO)

        logging.getLogger("dvc").setLevel(logging.ERROR)
        commit_outputs()
    except Exception as exc:  # DVC's errors are many classes; any of them means "not recorded"
        print(f"datumdb: dvc commit failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
