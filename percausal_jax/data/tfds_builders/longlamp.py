"""TFDS builder ``longlamp``: LongLaMP parquet files (HF ``LongLaMP/LongLaMP``) → canonical records."""

from __future__ import annotations

import tensorflow_datasets as tfds

from percausal_jax.data.sources import LONGLAMP_CONFIGS, LONGLAMP_SPLITS, longlamp_files, read_longlamp
from percausal_jax.data.tfds_builders.common import RecordBuilder
from percausal_jax.errors import UserError


class LongLamp(RecordBuilder):
    """One config per HF config; splits ``train``/``val``/``test`` (those whose files exist)."""

    name = "longlamp"
    DESCRIPTION = "LongLaMP (arXiv 2407.11016) as canonical records, one JSON text per example."
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in LONGLAMP_CONFIGS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the parquet files, e.g. `huggingface-cli download LongLaMP/LongLaMP --repo-type dataset "
        "--local-dir DIR`, and pass DIR (or DIR/<config>) as manual_dir. A split's files are found by name "
        "({split}-*.parquet) or by folder ({split}/*.parquet).")

    def _split_generators(self, dl_manager):
        root = self.manual_dir(dl_manager)
        config_dir = root / self.builder_config.name
        root = config_dir if config_dir.is_dir() else root
        splits = {split: files for split in LONGLAMP_SPLITS if (files := longlamp_files(root, split))}
        if not splits:
            raise UserError(f"{root}: no LongLaMP parquet files for splits {list(LONGLAMP_SPLITS)}; expected "
                            "names like train-00000-of-00001.parquet or folders train/, val/, test/")
        return {split: self._generate_examples(files) for split, files in splits.items()}

    def _generate_examples(self, files):
        yield from self.examples(read_longlamp(files))
