"""The LVLM side of k-shot in the trained miniature (issue 26; docs/demo.md "LVLM side of k-shot").

``python tools/kshot_lvlm.py`` measured every setting against the zero-shot LVLM on the same deferred
images (the first 1000 test images, then test rows 1000-4999 for the LoRAs): the 16-shot LoRA of
configs/lvlm/lora_demo_llava.yaml gained for every seed (+2.5 to +4.3 points on rows 1000-4999). This
test trains it (seed 1) through ``train.py fit`` and measures it against the zero-shot LVLM on test
rows 5000-9999, which no measurement or choice used, with a margin set before they were looked at.
In-context examples lose about 22 points at every k (the demo LLaVA was trained on one-image
prompts) and the 4-shot LoRA's gain is within noise for two seeds, so nothing is held for them.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cascadevlm.cli import main as cli
from cascadevlm.data.registry import FASHION_MNIST
from cascadevlm.records import PredictionRecord, read_records, write_records
from cascadevlm.zoo.miniature import CLIP_CHECKPOINT, CLIP_MODEL, LLAVA_DIR

REPO = Path(__file__).resolve().parents[1]
NAMES = list(FASHION_MNIST.class_names)
K, SEED = 16, 1
HELD_OUT = range(5000, 10000)  # test rows no measurement or choice used
MARGIN = 0.02  # below the smallest gain of the three seeds on rows 1000-4999 (+2.5 points)


def _clip_records_for_rows(data_root: Path, rows: list[int], path: Path) -> Path:
    """CLIP's top-5 over the given train rows (the LoRA's candidates, as tools/kshot_lvlm.py gives them)."""
    from cascadevlm.clip.model import load_clip
    from cascadevlm.data.loading import decode_image, load_dataset_dict
    from cascadevlm.zoo.pretrain import clip_pixels, clip_probs

    train = load_dataset_dict(str(data_root / "fashion_mnist"))["train"].select(rows)
    bundle = load_clip(CLIP_MODEL, pretrained=str(CLIP_CHECKPOINT))
    images = [np.asarray(decode_image(v, f"train row {r}").convert("L"), dtype=np.uint8)
              for r, v in zip(rows, train["image"], strict=True)]  # fmt: skip
    probs = clip_probs(
        bundle, clip_pixels(np.stack(images), bundle.preprocess), NAMES, list(FASHION_MNIST.templates)
    )
    p, top = probs.topk(5, dim=-1)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    recs = [
        PredictionRecord(index=r, label=int(y), clip_topk=top[i].tolist(), clip_topk_probs=p[i].tolist(),
                         entropy=float(ent[i]), clip_pred=int(top[i, 0]))
        for i, (r, y) in enumerate(zip(rows, train["label"], strict=True))
    ]  # fmt: skip
    return write_records(path, recs)


def _accuracy(backend, images, labels, cands) -> float:
    from cascadevlm.lvlm.base import LVLMRequest

    reqs = [LVLMRequest(image=im, candidates=[NAMES[c] for c in cs], key=str(i))
            for i, (im, cs) in enumerate(zip(images, cands, strict=True))]  # fmt: skip
    answers = backend.load().choose(reqs)
    return float(np.mean([cs[a.choice] == y for a, cs, y in zip(answers, cands, labels, strict=True)]))


@pytest.mark.slow
def test_kshot_lvlm_lora_beats_the_zero_shot_lvlm_on_held_out_deferred_images(data_root, tmp_path):
    from cascadevlm.data.kshot import KShotSplit
    from cascadevlm.data.loading import decode_image, load_dataset_dict
    from cascadevlm.lvlm.lora import LoRADataModule
    from cascadevlm.lvlm.prompts import PromptConfig
    from cascadevlm.lvlm.transformers_backend import TransformersBackend

    # the CLIP stage and the gate of configs/demo.yaml (tau from the 30% budget on val), test rows 0-9999
    cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--model.pretrained", str(CLIP_CHECKPOINT),
         "--lvlm.init_args.model", str(LLAVA_DIR), "--lvlm.init_args.device", "cpu",
         "--data.data_root", str(data_root), "--data.limit", str(HELD_OUT.stop), "--cascade.lvlm_on", "deferred",
         "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--answer_store", "null",
         "--run_name", "gate", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    records = read_records(tmp_path / "gate" / "records.parquet")
    sent = [r for r in records if r.deferred and r.index in HELD_OUT]
    test = load_dataset_dict(str(data_root / "fashion_mnist"))["test"]
    images = [decode_image(test[r.index]["image"], f"test row {r.index}") for r in sent]
    labels = [r.label for r in sent]
    cands = [list(r.clip_topk[:5]) for r in sent]
    clip = float(np.mean([r.clip_pred == r.label for r in sent]))

    # the k-shot LoRA through train.py and the committed config, CLIP's candidates on its k-shot rows
    splits = tmp_path / "splits"
    dm = LoRADataModule(
        dataset="fashion_mnist", shots=K, seed=SEED, splits_dir=str(splits), data_root=str(data_root)
    )
    assert isinstance(dm.split, KShotSplit) and len(dm.split.all_indices) == K * len(NAMES)
    rec_path = _clip_records_for_rows(
        data_root, sorted(dm.split.all_indices), tmp_path / "train_records.parquet"
    )
    cli(["train", "fit", "--config", str(REPO / "configs" / "lvlm" / "lora_demo_llava.yaml"),
         "--model.init_args.model", str(LLAVA_DIR), "--seed_everything", str(SEED),
         "--data.init_args.shots", str(K), "--data.init_args.seed", str(SEED),
         "--data.init_args.splits_dir", str(splits), "--data.init_args.data_root", str(data_root),
         "--data.init_args.records_path", str(rec_path), "--trainer.default_root_dir", str(tmp_path / "train"),
         "--trainer.enable_progress_bar", "false"])  # fmt: skip
    adapter = tmp_path / "train" / "fashion_mnist_lvlm_lora" / f"k{K}_seed{SEED}" / "lora_adapter"
    assert (adapter / "adapter_config.json").exists()

    # zero-shot and LoRA LLaVA, the evaluation config's prompt, the same held-out deferred images
    cfg = yaml.safe_load((REPO / "configs" / "lvlm" / "demo_llava_lora_score.yaml").read_text())["init_args"]
    base = yaml.safe_load((REPO / "configs" / "lvlm" / "demo_llava_score.yaml").read_text())["init_args"]
    assert cfg["prompt"] == base["prompt"]  # the adapter changes the weights only
    prompt = PromptConfig(**cfg["prompt"])

    def backend(**kw):
        return TransformersBackend(model=str(LLAVA_DIR), mode="score", device="cpu", batch_size=64, prompt=prompt,
                                   **kw)  # fmt: skip

    zero = _accuracy(backend(), images, labels, cands)
    lora = _accuracy(backend(lora_path=str(adapter)), images, labels, cands)
    info = json.dumps({"deferred": len(sent), "clip": clip, "zero_shot": zero, "lora": lora})
    print(info)
    assert len(sent) >= 200, info
    assert zero >= clip + 0.10, info  # the zero-shot LLaVA is the reader the issue asks for
    assert lora >= zero + MARGIN, info
