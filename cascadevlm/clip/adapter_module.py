"""Old import path of the adapter training classes, kept so configs saved by earlier runs still load.

New code imports from :mod:`cascadevlm.clip.adapters`.
"""

from cascadevlm.clip.adapters import (
    AdapterCheckpoint,
    AdapterModule,
    KShotFeatureDataModule,
    LinearProbeModule,
    PromptTuningModule,
    confusion_figure,
)

__all__ = [
    "AdapterCheckpoint",
    "AdapterModule",
    "KShotFeatureDataModule",
    "LinearProbeModule",
    "PromptTuningModule",
    "confusion_figure",
]
