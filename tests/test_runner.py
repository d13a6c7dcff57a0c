"""The CLIP stage (cascade/runner.py): zero-shot CLIP beside an adapter that changes the weights."""

from __future__ import annotations

import torch

from cascadevlm.cli import run_evaluate
from cascadevlm.clip.adapters.clip_lora import ClipLoraModule
from cascadevlm.data.registry import FASHION_MNIST
from cascadevlm.records import read_records
from cascadevlm.zoo.tiny_clip import TINY_CLIP


def _trained_looking_lora(tiny_clip_path, path):
    """A CLIP-LoRA adapter file whose B matrices are not zero (a LoRA that moved the weights)."""
    module = ClipLoraModule(TINY_CLIP, str(tiny_clip_path), class_names=list(FASHION_MNIST.class_names),
                            rank=4, alpha=8, log_confusion_matrix=False)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.adapter.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.save_adapter(path)


def test_clip_lora_zero_shot_row_is_a_plain_zero_shot_evaluation_of_the_base_weights(
    tiny_clip_path, data_root, tmp_path
):
    """The clip_zero_shot row of a CLIP-LoRA evaluation was the merged (adapted) model."""
    lora = _trained_looking_lora(tiny_clip_path, tmp_path / "lora.safetensors")
    args = [
        "--model.model_name", TINY_CLIP, "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "40",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--quiet",
    ]  # fmt: skip
    plain = run_evaluate([*args, "--run_name", "zero_shot"])
    adapted = run_evaluate([*args, "--run_name", "lora", "--model.adapter", str(lora)])
    assert adapted["methods"]["clip_zero_shot"]["acc1"] == plain["methods"]["clip"]["acc1"]
    zs = read_records(tmp_path / "zero_shot" / "records.parquet")
    recs = read_records(tmp_path / "lora" / "records.parquet")
    assert [r.clip_zero_shot_pred for r in recs] == [r.clip_pred for r in zs]
    assert sum(r.clip_pred != r.clip_zero_shot_pred for r in recs) >= 3  # the LoRA moved predictions
