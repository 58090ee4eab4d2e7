"""TFDS builder for the procedural synthetic faces (builds offline, deterministic)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_prep.synthetic_faces import make_face

SPLIT_SIZES = {"train": 4000, "validation": 300, "test": 300}
_SPLIT_OFFSETS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
    """96x96 grayscale synthetic faces with 68 landmarks (iBUG order)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Procedurally drawn faces with exact 68-point landmarks; no download needed.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(96, 96, 1), encoding_format="png"),
                    "landmarks": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
                    "seed": np.int64,
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(name, n) for name, n in SPLIT_SIZES.items()}

    def _generate_examples(self, split: str, count: int):
        for i in range(count):
            seed = _SPLIT_OFFSETS[split] + i
            image, landmarks = make_face(seed, 96)
            yield i, {"image": image[..., None], "landmarks": landmarks, "seed": seed}
