"""Caffe's ``Datum`` and ``BlobProto`` messages: ``datum.proto`` and the generated ``datum_pb2``.

Kept free of imports so that ``python -m datumdb.proto.regenerate`` works even when the
generated module is missing or stale.
"""
