"""LoRA on cascade prompts (cascadevlm/lvlm/lora.py), trained through train.py's LightningCLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lvlm_fixtures import llava_dir, photo_dataset, photos  # noqa: F401

from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.lora import LoRADataModule, LoRAModule, collate_prompts, training_candidates
from cascadevlm.lvlm.transformers_backend import TransformersBackend

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lvlm" / "lora_tiny_llava.yaml"


def test_training_candidates_are_deterministic_and_contain_the_answer():
    seen_positions = set()
    for row in range(40):
        cands, pos = training_candidates(label=3, num_classes=11, k=4, seed=0, row=row)
        assert len(set(cands)) == 4 and cands[pos] == 3
        assert (cands, pos) == training_candidates(3, 11, 4, 0, row)
        seen_positions.add(pos)
    assert seen_positions == {0, 1, 2, 3}  # the answer is not always first
    # from CLIP's top-k: CLIP's order is kept; a missed true class takes a random slot
    assert training_candidates(3, 11, 4, 0, 7, clip_topk=[5, 3, 1, 0, 2]) == ([5, 3, 1, 0], 1)
    cands, pos = training_candidates(9, 11, 4, 0, 7, clip_topk=[5, 3, 1, 0])
    assert cands[pos] == 9 and [c for c in cands if c != 9] == [c for c in [5, 3, 1, 0] if c in cands]


def _mean_loss(module: LoRAModule, dm: LoRADataModule) -> float:
    module.eval()
    batch = collate_prompts([dm.train_set[i] for i in range(len(dm.train_set))])
    with torch.no_grad():
        return float(module.loss(batch))


@pytest.mark.slow
def test_lora_lowers_the_loss_and_the_adapter_reloads(llava_dir, photo_dataset, photos, tmp_path):  # noqa: F811
    from cascadevlm.cli import train_main

    data_dir, split_path = photo_dataset
    best_dir = tmp_path / "adapter"
    config = yaml.safe_load(CONFIG.read_text())  # the shipped config, pointed at the test's model and data
    config["model"]["init_args"].update(
        model=str(llava_dir), adapter_dir=str(best_dir), lr=0.01, prompt={"noun": "object"}
    )
    config["data"]["init_args"].update(
        dataset=str(data_dir),
        kshot_path=str(split_path),
        num_candidates=4,
        batch_size=11,
        val_split="val",
        val_limit=8,
    )
    config["trainer"].update(
        max_epochs=5, accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False
    )
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(tmp_path / "lora.yaml")]
    cli = train_main(args)
    module, dm = cli.model, cli.datamodule
    assert isinstance(module, LoRAModule) and len(dm.train_set) == 22  # k=2 x 11 classes

    fresh = LoRAModule(model=str(llava_dir), prompt=module.prompt)  # LoRA starts as the identity
    before, after = _mean_loss(fresh, dm), _mean_loss(module, dm)
    assert after < 0.5 * before, (before, after)

    # only LoRA weights trained; the best adapter by val loss was kept, in peft's format
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert len(module.val_losses) == 5 and module.best_val == min(module.val_losses)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in best_dir.iterdir()}
    assert json.loads((best_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        llava_dir
    )

    # the saved adapter, loaded by the evaluation backend, gives the trained module's scores
    final_dir = module.save_adapter(tmp_path / "final")
    reqs = [
        LVLMRequest(image=photos[n], candidates=[n, "coins", "galaxy", "cat"]) for n in ["horse", "flower"]
    ]
    batch = collate_prompts(
        [{"index": i, "image": r.image, "candidates": r.candidates, "target": 0} for i, r in enumerate(reqs)]
    )
    with torch.no_grad():
        expected = module.scores(batch)
    for merge in (False, True):
        backend = TransformersBackend(
            str(llava_dir), device="cpu", prompt=module.prompt, lora_path=str(final_dir), merge_lora=merge
        )
        got = backend.score(
            [LVLMRequest(image=r.image, candidates=r.candidates, key=str(i)) for i, r in enumerate(reqs)]
        )
        assert got == [pytest.approx(e, abs=1e-4) for e in expected]
    base = TransformersBackend(str(llava_dir), device="cpu", prompt=module.prompt).score(reqs)
    assert max(abs(a - b) for a, b in zip(base[0], expected[0], strict=True)) > 1e-2  # the adapter matters
