"""The datumdb pipeline: params.yaml -> records -> one LMDB per split -> verify, mean -> report.

Each step is a function over a typed, frozen :class:`~datumdb.pipeline.config.PipelineConfig`
(built from params.yaml by :func:`~datumdb.pipeline.config.load_config`), called by the
``datumdb pipeline`` commands that the Snakefile's rules and ``dvc.yaml``'s stages run:

* :mod:`~datumdb.pipeline.build`: ``records`` (one job per shard), ``build`` (one writer per
  split), ``build-all`` (DVC: the shards in parallel processes, then every split);
* :mod:`~datumdb.pipeline.check`: ``verify`` a split against its source, with a contact sheet
  (:mod:`~datumdb.pipeline.sheet`);
* :mod:`~datumdb.pipeline.mean`: the train mean; :mod:`~datumdb.pipeline.summary`: the report;
* :mod:`~datumdb.pipeline.fingerprint` and :mod:`~datumdb.pipeline.outputs`: what each output
  records about how it was made, and which outputs are stale.
"""
