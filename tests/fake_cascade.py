"""Helpers for cascade tests that use the instant offline LVLM (:mod:`cascadevlm.testing.fake_lvlm`)."""

from __future__ import annotations

from pathlib import Path

FAKE = "cascadevlm.testing.fake_lvlm.FakeLVLM"


def fake_args(
    tiny_clip_path, data_root, out: Path, name: str | None = "r", *extra: str, limit: int = 40
) -> list:
    """evaluate.py arguments: the tiny CLIP on ``limit`` Fashion-MNIST test images, the fake LVLM."""
    args = [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root),
        "--data.limit", str(limit), "--data.batch_size", "32",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--lvlm.class_path", FAKE,
        "--output_dir", str(out), "--cache_dir", str(out / "cache"),
    ]  # fmt: skip
    if name is not None:
        args += ["--run_name", name]
    return [*args, *extra]
