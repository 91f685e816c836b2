"""The datumdb pipeline: params.yaml -> plan -> shard sets -> assembled LMDBs -> verify, mean -> report.

Each step is a function over a typed, frozen :class:`~datumdb.pipeline.config.PipelineConfig`
(built from params.yaml by :func:`~datumdb.pipeline.config.load_config`), called by the
``datumdb pipeline`` commands that the Snakefile's rules and ``dvc.yaml``'s stages run:

* :mod:`~datumdb.pipeline.plan`: which samples make up which content-defined shard, and the
  fingerprint each shard must record;
* :mod:`~datumdb.pipeline.shards`: ``shards`` builds the missing or stale shards (one job per
  part under Snakemake; every part in parallel processes under DVC) and indexes each split;
* :mod:`~datumdb.pipeline.assemble`: ``assemble`` derives each split's one Caffe database;
* :mod:`~datumdb.pipeline.check`: ``verify`` a split against its source, with a contact sheet
  (:mod:`~datumdb.pipeline.sheet`);
* :mod:`~datumdb.pipeline.processes`: DVC's stages over every part or split spread them over
  the cores (DVC runs one stage at a time; Snakemake runs a job each);
* :mod:`~datumdb.pipeline.mean`: the train mean; :mod:`~datumdb.pipeline.summary`: the report;
* :mod:`~datumdb.pipeline.fingerprint` and :mod:`~datumdb.pipeline.outputs`: what each output
  records about how it was made, and which outputs are stale.
"""
