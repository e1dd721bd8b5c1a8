"""What both builders share: the one-feature schema, manual-dir checks, and ``prepare``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from percausal_jax.errors import UserError


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose examples are ``{"record": <canonical record as JSON text>}`` keyed by record id.

    Source order is kept (``disable_shuffling``), so shards read back in file order. Nothing is downloaded, so
    there is no checksums file: ``code_path = None`` says so, which also keeps TFDS from resolving this module
    through ``importlib_resources`` (imported by tensorflow-datasets 4.9.10 but not among its dependencies).
    """

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, disable_shuffling=True,
                                     features=tfds.features.FeaturesDict({"record": tfds.features.Text()}))

    @staticmethod
    def manual_dir(dl_manager) -> Path:
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS asserts that the folder exists and is not empty
            raise UserError(f"manual dir: {e}") from None

    @staticmethod
    def examples(records: Iterable[dict]) -> Iterator[tuple[str, dict]]:
        for record in records:
            yield record["id"], {"record": json.dumps(record, ensure_ascii=False)}


def prepare(builder_cls: type[RecordBuilder], config: str, *, manual_dir: str | os.PathLike,
            data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Builds ``builder_cls(config)`` from the raw files in ``manual_dir`` into ArrayRecord under ``data_dir``
    (skipped if already there) and returns the builder; read with ``builder.as_data_source()[split]``."""
    names = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if config not in names:
        raise UserError(f"{builder_cls.name} config {config!r}: expected one of {names}")
    raw = Path(manual_dir)
    if not raw.is_dir():
        raise UserError(f"{raw}: no such folder; expected the folder of raw {builder_cls.name} files")
    builder = builder_cls(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
    return builder
