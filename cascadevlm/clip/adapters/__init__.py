"""Few-shot CLIP adapters, one module per method, on a shared base (save/load with safetensors metadata).

``base``: the file format, :func:`save_adapter`, :func:`load_adapter`, :func:`adapter_info`;
``linear_probe``, ``coop``, ``tip_adapter`` (Tip-Adapter, Tip-Adapter-F), ``clip_adapter``: the
methods (their head, their LightningModule, their registry entry); ``module``: the shared
LightningModule; ``datamodule``: the k-shot feature DataModule; ``checkpoint``: the callback that
exports the best adapter.
"""

from cascadevlm.clip.adapters.base import (
    CTX_PLACEHOLDER,
    FORMAT,
    FORMAT_VERSION,
    METHOD_OF_KIND,
    AdapterFile,
    AdapterKind,
    AdapterMismatchError,
    WiseHead,
    adapter_info,
    adapter_kind,
    adapter_kinds,
    adapter_metadata,
    check_adapter_fits,
    check_adapter_mix,
    class_names_sha256,
    load_adapter,
    read_adapter,
    register_adapter_kind,
    save_adapter,
)
from cascadevlm.clip.adapters.checkpoint import AdapterCheckpoint, confusion_figure
from cascadevlm.clip.adapters.clip_adapter import ClipAdapterHead, ClipAdapterModule
from cascadevlm.clip.adapters.clip_lora import ClipLoraModule, KShotImageDataModule, merge_clip_lora
from cascadevlm.clip.adapters.coop import (
    FrozenTextEncoder,
    PromptHead,
    PromptLearner,
    PromptTuningModule,
    count_phrase_tokens,
)
from cascadevlm.clip.adapters.datamodule import KShotFeatureDataModule
from cascadevlm.clip.adapters.linear_probe import LinearProbe, LinearProbeModule
from cascadevlm.clip.adapters.module import OPTIMIZERS, AdapterModule
from cascadevlm.clip.adapters.tip_adapter import TipAdapterFModule, TipAdapterHead, TipAdapterModule

__all__ = [
    "CTX_PLACEHOLDER",
    "FORMAT",
    "FORMAT_VERSION",
    "METHOD_OF_KIND",
    "OPTIMIZERS",
    "AdapterCheckpoint",
    "AdapterFile",
    "AdapterKind",
    "AdapterMismatchError",
    "AdapterModule",
    "ClipAdapterHead",
    "ClipAdapterModule",
    "ClipLoraModule",
    "FrozenTextEncoder",
    "KShotFeatureDataModule",
    "KShotImageDataModule",
    "LinearProbe",
    "LinearProbeModule",
    "PromptHead",
    "PromptLearner",
    "PromptTuningModule",
    "TipAdapterFModule",
    "TipAdapterHead",
    "TipAdapterModule",
    "WiseHead",
    "adapter_info",
    "adapter_kind",
    "adapter_kinds",
    "adapter_metadata",
    "check_adapter_fits",
    "check_adapter_mix",
    "class_names_sha256",
    "confusion_figure",
    "count_phrase_tokens",
    "load_adapter",
    "merge_clip_lora",
    "read_adapter",
    "register_adapter_kind",
    "save_adapter",
]
