"""TFDS builder ``lamp``: LaMP ``{split}_questions.json`` + ``{split}_outputs.json`` → canonical records."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from percausal_jax.data.sources import LAMP_SPLITS, lamp_outputs_path, read_lamp
from percausal_jax.data.tfds_builders.common import RecordBuilder
from percausal_jax.errors import UserError

LAMP_TASKS = tuple(f"LaMP-{n}" for n in range(1, 8))


class Lamp(RecordBuilder):
    """One config per task (``LaMP-1`` ... ``LaMP-7``); splits ``train``/``dev``/``test`` (those present). The
    test split has no public outputs: its records come without ``output`` (usable for generation only)."""

    name = "lamp"
    DESCRIPTION = "LaMP (arXiv 2304.11406) as canonical records, one JSON text per example."
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=task) for task in LAMP_TASKS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the task's files from https://ciir.cs.umass.edu/downloads/LaMP/ (e.g. LaMP_3/dev/dev_questions.json "
        "and dev_outputs.json) and pass their folder as manual_dir; files may sit directly in it or in train/, dev/, "
        "test/ subfolders.")

    def _split_generators(self, dl_manager):
        root = self.manual_dir(dl_manager)
        splits = {}
        for split in LAMP_SPLITS:
            found = [p for p in (root / f"{split}_questions.json", root / split / f"{split}_questions.json")
                     if p.is_file()]
            if found:
                splits[split] = self._generate_examples(found[0])
        if not splits:
            raise UserError(f"{root}: no LaMP files; expected {{train,dev,test}}_questions.json (with "
                            "_outputs.json beside them), directly or in train/, dev/, test/ folders")
        return splits

    def _generate_examples(self, questions: Path):
        outputs = lamp_outputs_path(questions)
        yield from self.examples(read_lamp(questions, outputs, task=self.builder_config.name,
                                           require_output=outputs is not None))
