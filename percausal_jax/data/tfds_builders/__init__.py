"""TFDS builders writing canonical records to ArrayRecord, for random access from Grain without TensorFlow.

Each example has one feature, ``record``: the canonical record as JSON text (profile items kept). Nothing is
downloaded: the builders read the raw files the user fetched (manual-dir style). Prepare once, then read anywhere::

    builder = prepare(LongLamp, "product_review_user", manual_dir="raw/LongLaMP", data_dir="tfds")
    source = builder.as_data_source()["val"]          # or tfds.data_source("longlamp/product_review_user",
    it = pipeline.make_iterator(source, ...)          #                        data_dir="tfds")["val"]

Importing this package registers the builders (``longlamp``, ``lamp``) with TFDS.
"""

from __future__ import annotations


from percausal_jax.data.tfds_builders.common import prepare
from percausal_jax.data.tfds_builders.lamp import Lamp
from percausal_jax.data.tfds_builders.longlamp import LongLamp

__all__ = ["Lamp", "LongLamp", "prepare"]
