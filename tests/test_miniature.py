"""The trained miniature (cascadevlm/zoo/checkpoints): the paper's claims on a fixed subset of Fashion-MNIST's
TEST split, canaries proving those checks catch wiring bugs, DDP and resume, and the pretraining script.

The models are loaded through the user's route (configs/demo.yaml: ``--model.pretrained`` and the LVLM
config's ``model`` directory). Thresholds are the issue's, on the first 400 test images (the spelling
checks: the first 2000, about 600 deferred).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascadevlm.cascade.lvlm_stage import DeferredImages
from cascadevlm.cli import run_evaluate as main
from cascadevlm.data.registry import FASHION_MNIST
from cascadevlm.lvlm.transformers_backend import TransformersBackend
from cascadevlm.provenance import read_provenance
from cascadevlm.records import read_records
from cascadevlm.zoo.miniature import (
    CHECKPOINTS,
    CLIP_CHECKPOINT,
    CLIP_MODEL,
    LEFT_OUT,
    LLAVA_DIR,
    LLAVA_SMALL_DIR,
    cascade_claims,
    claim_failures,
    group_accuracy,
    manifest,
    spelling,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = list(FASHION_MNIST.class_names)
LEFT_IDS = [NAMES.index(n) for n in LEFT_OUT]
SEEN_IDS = [c for c in range(len(NAMES)) if c not in LEFT_IDS]
LIMIT = 400  # the first 400 test images (all ten classes, about 40 each)


def _args(data_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.pretrained", str(CLIP_CHECKPOINT), "--lvlm.init_args.model", str(LLAVA_DIR),
        "--lvlm.init_args.device", "cpu", "--data.data_root", str(data_root), "--data.limit", str(LIMIT),
        "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--run_name", name,
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(data_root, tmp_path_factory):
    """configs/demo.yaml on the test subset; records and metrics.json's content."""
    out = tmp_path_factory.mktemp("miniature")
    metrics = main(_args(data_root, out, "demo", "--cascade.lvlm_on", "deferred"))
    return read_records(out / "demo" / "records.parquet"), metrics, out


# ------------------------------------------------------------------------------------------ the models
def test_committed_models_match_their_manifest_and_say_what_they_are():
    m = manifest()
    files = {p.relative_to(CHECKPOINTS).as_posix(): p for p in CHECKPOINTS.rglob("*") if p.is_file()}
    assert set(files) - {"manifest.json"} == set(m["files"])
    import hashlib

    for rel, digest in m["files"].items():
        assert hashlib.sha256(files[rel].read_bytes()).hexdigest() == digest, rel
    assert sum(p.stat().st_size for p in files.values()) < 30 * 2**20
    assert m["data"]["test_split"] == "never read" and m["left_out_classes"] == list(LEFT_OUT)
    for path in (CLIP_CHECKPOINT, LLAVA_DIR, LLAVA_SMALL_DIR):
        mark = read_provenance(path)
        assert mark is not None and mark["kind"] == "trained-demo", path
        assert "Fashion-MNIST's train split" in mark["description"]


def test_clip_zero_shot_knows_the_seen_classes_not_the_left_out_ones(demo_run):
    records, _, _ = demo_run
    seen = group_accuracy(records, SEEN_IDS)
    left = group_accuracy(records, LEFT_IDS)
    assert seen >= 0.65, seen  # chance is 0.10
    assert left <= seen - 0.30, (seen, left)


# ------------------------------------------------------------------------------------------ the claims
def test_lvlm_beats_clip_where_clip_is_unsure_and_the_cascade_beats_clip(demo_run):
    records, metrics, out = demo_run
    gate = json.loads((out / "demo" / "gate.json").read_text())
    assert gate["budget_split_deferral"] <= 0.30  # the budget holds where tau was chosen (val)
    numbers = cascade_claims(records, gate["tau"])
    # the test subset's fraction may drift a little from val's
    assert claim_failures(numbers, max_deferred=0.35) == [], numbers
    assert metrics["metrics"]["acc1"] == pytest.approx(numbers["cascade"])


def _canary(monkeypatch, data_root, out: Path, name: str) -> dict:
    # the answer store off: it would serve the demo run's answers, looked up before the patched backend
    main(_args(data_root, out, name, "--cascade.lvlm_on", "deferred", "--answer_store", "null"))
    tau = json.loads((out / name / "gate.json").read_text())["tau"]
    return cascade_claims(read_records(out / name / "records.parquet"), tau)


def test_claims_are_recomputed_from_what_the_records_measured_not_from_final():
    """Six images, tau 1.0: two deferred (entropy 2.0); the stored ``final`` is the LVLM's everywhere (the
    bug of taking the LVLM's answer on confident images too), which the checker must not believe."""
    from cascadevlm.records import PredictionRecord

    rows = [  # (label, clip top-1, entropy, lvlm choice)
        (0, 0, 0.1, 0), (1, 2, 0.2, 1), (2, 2, 0.3, 2), (3, 3, 0.4, 3), (4, 5, 2.0, 4), (5, 0, 2.0, 1),
    ]  # fmt: skip
    records = [
        PredictionRecord(index=i, label=y, clip_topk=[c, (c + 1) % 6], clip_topk_probs=[0.6, 0.4], entropy=e,
                         clip_pred=c, deferred=True, lvlm_choice=v, final=v)
        for i, (y, c, e, v) in enumerate(rows)
    ]  # fmt: skip
    numbers = cascade_claims(records, 1.0)
    assert numbers["clip"] == pytest.approx(3 / 6)
    assert numbers["cascade"] == pytest.approx(4 / 6)  # the stored finals would say 5 / 6
    assert numbers["deferred_fraction"] == pytest.approx(2 / 6)
    assert numbers["clip_on_deferred"] == 0.0 and numbers["lvlm_on_deferred"] == pytest.approx(1 / 2)
    assert numbers["stored_final_differs"] == 1 and numbers["stored_deferred_differs"] == 4
    failures = claim_failures(numbers, max_deferred=0.5)
    assert failures[:2] == [
        "the records' stored 'final' differs from the cascade recomputed from entropy, tau and the LVLM's "
        "choice on 1 images",
        "the records' stored 'deferred' differs from the cascade recomputed from entropy, tau and the LVLM's "
        "choice on 4 images",
    ]
    honest = [PredictionRecord(**{**r.__dict__, "deferred": r.entropy > 1.0,
                                  "final": r.lvlm_choice if r.entropy > 1.0 else r.clip_pred}) for r in records]  # fmt: skip
    assert cascade_claims(honest, 1.0)["stored_final_differs"] == 0
    assert claim_failures(cascade_claims(honest, 1.0), max_deferred=0.5) == []


def test_canary_lvlm_given_other_images_than_its_records_is_caught(demo_run, data_root, monkeypatch):
    real = DeferredImages.__getitem__

    def shifted(self, i):  # the image of the next deferred record, under this record's index
        item = real(self, i)
        item["image"] = real(self, (i + 1) % len(self))["image"]
        return item

    monkeypatch.setattr(DeferredImages, "__getitem__", shifted)
    numbers = _canary(monkeypatch, data_root, demo_run[2], "shuffled")
    assert numbers["lvlm_on_deferred"] < 0.40, numbers  # near chance (1 in 5 candidates)
    assert any("LVLM" in f for f in claim_failures(numbers)), numbers


def test_canary_candidates_in_reversed_order_is_caught(demo_run, data_root, monkeypatch):
    real = TransformersBackend.choose

    def reversed_choose(self, requests):  # shown reversed, answers read in the original order
        for r in requests:
            r.candidates = r.candidates[::-1]
        return real(self, requests)

    monkeypatch.setattr(TransformersBackend, "choose", reversed_choose)
    numbers = _canary(monkeypatch, data_root, demo_run[2], "reversed")
    assert numbers["lvlm_on_deferred"] < 0.40, numbers
    assert any("LVLM" in f for f in claim_failures(numbers)), numbers


# ------------------------------------------------------------------------------------------ reading the options
# the demo's 2000 test images: about 600 deferred (400 give ~100, margins of 1-2 images)
SPELLING_LIMIT = 2000


@pytest.fixture(scope="module")
def deferred(demo_run, data_root):
    """The deferred images among the first 2000 test images (CLIP's stage through evaluate.py, CLIP only;
    the demo run's tau, chosen on val) with CLIP's top-5 (ids) and CLIP's accuracy on them."""
    from cascadevlm.data.loading import decode_image, load_dataset_dict

    _, _, out = demo_run
    tau = json.loads((out / "demo" / "gate.json").read_text())["tau"]
    args = _args(data_root, out, "clip2000", "--lvlm", "null")
    args[args.index("--data.limit") + 1] = str(SPELLING_LIMIT)
    main(args)
    records = read_records(out / "clip2000" / "records.parquet")
    assert len(records) == SPELLING_LIMIT
    sent = [r for r in records if r.entropy > tau]
    test = load_dataset_dict(str(data_root / "fashion_mnist"))["test"]
    images = [decode_image(test[r.index]["image"], f"test row {r.index}") for r in sent]
    clip = float(np.mean([r.clip_pred == r.label for r in sent]))
    return images, [r.label for r in sent], [list(r.clip_topk[:5]) for r in sent], clip


def _lvlm_on(model_dir: Path, deferred, names: list[str]) -> float:
    """The LVLM (the demo config's prompt) choosing among CLIP's top-5, named ``names``."""
    import yaml

    from cascadevlm.lvlm.base import LVLMRequest
    from cascadevlm.lvlm.prompts import PromptConfig

    cfg = yaml.safe_load((REPO / "configs" / "lvlm" / "demo_llava_score.yaml").read_text())["init_args"]
    prompt = PromptConfig(**cfg["prompt"])
    backend = TransformersBackend(
        model=str(model_dir), mode="score", device="cpu", batch_size=64, prompt=prompt
    )
    images, labels, cands, _ = deferred
    reqs = [LVLMRequest(image=im, candidates=[names[c] for c in cs], key=str(i))
            for i, (im, cs) in enumerate(zip(images, cands, strict=True))]  # fmt: skip
    answers = backend.load().choose(reqs)
    return float(np.mean([cs[a.choice] == y for a, cs, y in zip(answers, cands, labels, strict=True)]))


@pytest.mark.parametrize("scheme", ["registry", "official", "upper"])
def test_lvlm_reads_the_candidates_in_three_spellings(deferred, scheme):
    """CLIP's stage keeps the registry's names; only the names SHOWN TO THE LVLM change: the registry's
    ("t-shirt"), the dataset's official ones ("T-shirt/top", "Ankle boot") and FULL UPPER CASE."""
    names = spelling(NAMES, scheme)
    acc = _lvlm_on(LLAVA_DIR, deferred, names)
    clip = deferred[3]
    assert acc >= clip + 0.10, (scheme, acc, clip, len(deferred[1]))


def test_canary_names_swapped_between_classes_are_caught(deferred):
    """A reader follows the names: shown each class under the next class's name, it is mostly wrong."""
    swapped = NAMES[1:] + NAMES[:1]
    assert _lvlm_on(LLAVA_DIR, deferred, swapped) < deferred[3], deferred[3]


def test_small_lvlm_is_cheaper_weaker_and_still_beats_clip_where_clip_is_unsure(deferred):
    """configs/lvlm/demo_llava_small_score.yaml's model (issue 24's cheap stage), through the user's route."""
    import yaml
    from transformers import AutoModelForImageTextToText

    cfg = yaml.safe_load((REPO / "configs" / "lvlm" / "demo_llava_small_score.yaml").read_text())["init_args"]
    assert (REPO / cfg["model"]).resolve() == LLAVA_SMALL_DIR
    main_cfg = yaml.safe_load((REPO / "configs" / "lvlm" / "demo_llava_score.yaml").read_text())["init_args"]
    assert cfg["prompt"] == main_cfg["prompt"]  # same prompt: the stages differ in the model only

    def params(d):
        return sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(d).parameters())

    assert params(LLAVA_SMALL_DIR) * 3 < params(LLAVA_DIR)
    small = _lvlm_on(LLAVA_SMALL_DIR, deferred, NAMES)
    big = _lvlm_on(LLAVA_DIR, deferred, NAMES)
    clip = deferred[3]
    assert clip + 0.10 <= small <= big, (clip, small, big)
    m = manifest()
    cost = m["lvlm_small"]["val_most_uncertain_30pct"]["seconds_per_image"]
    assert cost < m["lvlm"]["val_most_uncertain_30pct"]["seconds_per_image"]


# ------------------------------------------------------------------------------------------ full fine-tuning
def test_full_finetuning_trains_every_weight_and_saves_a_loadable_model_directory(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cascadevlm.lvlm.lora import LoRAModule
    from cascadevlm.testing.images import sample_photos
    from cascadevlm.zoo.tiny_lvlm import build_tiny_llava

    base = build_tiny_llava(tmp_path / "base")
    with pytest.raises(
        ValueError, match=r"finetune must be 'lora' or 'full', got 'half' \(--model.init_args"
    ):
        LoRAModule(model=str(base), finetune="half")
    module = LoRAModule(model=str(base), finetune="full", lr=1e-2)
    params = dict(module.net.named_parameters())
    assert all(p.requires_grad for p in params.values())
    tower = next(n for n in params if "vision_tower" in n and n.endswith("weight"))
    before = params[tower].detach().clone()
    photos = list(sample_photos().values())[:2]
    batch = {"index": torch.tensor([0, 1]), "image": photos, "candidates": [["cat", "horse"]] * 2,
             "target": torch.tensor([0, 1])}  # fmt: skip
    opt = module.configure_optimizers()
    module.loss(batch).backward()
    opt.step()
    assert not torch.equal(before, params[tower])  # the vision tower learns too, not only adapters
    saved = module.save_adapter(tmp_path / "full")
    assert not (saved / "adapter_config.json").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(saved)
    assert torch.equal(dict(loaded.named_parameters())[tower], params[tower].detach())
    assert AutoProcessor.from_pretrained(saved).chat_template


# ------------------------------------------------------------------------------------------ k-shot
def _features(bundle, images) -> torch.Tensor:
    with torch.no_grad():
        x = torch.stack([bundle.preprocess(im) for im in images])
        return bundle.model.encode_image(x)


def test_sixteen_shot_linear_probe_learns_the_left_out_classes(data_root):
    """A fast variant of the settings sweep's linear probe (same head, same k-shot sampler), 3 seeds."""
    from cascadevlm.clip.adapters import LinearProbe
    from cascadevlm.clip.model import load_clip
    from cascadevlm.clip.zero_shot import build_zero_shot_head
    from cascadevlm.data.kshot import sample_kshot
    from cascadevlm.data.loading import decode_image, load_dataset_dict

    bundle = load_clip(CLIP_MODEL, str(CLIP_CHECKPOINT))
    dsd = load_dataset_dict(str(data_root / "fashion_mnist"))
    test = dsd["test"].select(range(LIMIT))
    y_test = torch.tensor(test["label"])
    f_test = _features(bundle, [decode_image(v, "test") for v in test["image"]])
    head = build_zero_shot_head(bundle.model, bundle.tokenizer, NAMES, list(FASHION_MNIST.templates))
    scale = float(bundle.model.logit_scale.exp())
    left = torch.isin(y_test, torch.tensor(LEFT_IDS))

    def left_acc(probe) -> float:
        with torch.no_grad():
            return float((probe(f_test).argmax(-1) == y_test)[left].float().mean())

    k0 = left_acc(LinearProbe(head, scale))  # untrained probe = zero-shot CLIP
    train_labels = dsd["train"]["label"]
    accs = []
    for seed in (1, 2, 3):
        split = sample_kshot(train_labels, 16, seed, "fashion_mnist", len(NAMES))
        rows = split.all_indices
        f = _features(bundle, [decode_image(dsd["train"][r]["image"], "train") for r in rows])
        y = torch.tensor([train_labels[r] for r in rows])
        torch.manual_seed(seed)
        probe = LinearProbe(head, scale)
        opt = torch.optim.AdamW(probe.parameters(), lr=0.01, weight_decay=1e-4)
        for _ in range(150):
            loss = torch.nn.functional.cross_entropy(probe(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs.append(left_acc(probe))
    assert np.mean(accs) >= k0 + 0.10, (k0, accs)


# ------------------------------------------------------------------------------------------ DDP, resume
@pytest.mark.slow
def test_two_ddp_processes_give_the_same_records_and_accuracy(data_root, tmp_path):
    def run(name, *extra):
        a = _args(data_root, tmp_path, name, "--data.limit", "120", "--cascade.lvlm_on", "deferred", *extra)
        p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *a], cwd=REPO, capture_output=True, text=True,
                           timeout=500, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return read_records(tmp_path / name / "records.parquet"), json.loads(
            (tmp_path / name / "metrics.json").read_text()
        )

    one, m1 = run("one")
    two, m2 = run("two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert m2["params"]["devices"] == 2
    assert [r.index for r in two] == list(range(120))
    key = [(r.index, r.label, r.clip_topk, r.deferred, r.lvlm_choice, r.final) for r in one]
    assert key == [(r.index, r.label, r.clip_topk, r.deferred, r.lvlm_choice, r.final) for r in two]
    assert m1["metrics"]["acc1"] == pytest.approx(m2["metrics"]["acc1"])
    assert m1["metrics"]["acc1"] > 0.5  # trained models: a label shifted by the merge would show here


@pytest.mark.slow
def test_interrupted_and_resumed_run_gives_the_same_accuracy(demo_run, data_root, tmp_path, monkeypatch):
    records, metrics, _ = demo_run
    real = TransformersBackend.choose
    state = {"batches": 0}

    def crashing(self, requests):
        state["batches"] += 1
        if state["batches"] > 1:
            raise RuntimeError("simulated crash")
        return real(self, requests)

    monkeypatch.setattr(TransformersBackend, "choose", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(data_root, tmp_path, "resumed", "--cascade.lvlm_on", "deferred"))
    monkeypatch.setattr(TransformersBackend, "choose", real)
    again = main(_args(data_root, tmp_path, "resumed", "--cascade.lvlm_on", "deferred"))
    assert again["metrics"]["acc1"] == pytest.approx(metrics["metrics"]["acc1"])
    resumed = read_records(tmp_path / "resumed" / "records.parquet")
    assert [(r.index, r.final) for r in resumed] == [(r.index, r.final) for r in records]


# ------------------------------------------------------------------------------------------ pretraining
@pytest.mark.slow
def test_pretraining_script_runs_a_few_steps_and_writes_loadable_marked_models(data_root, tmp_path):
    from transformers import AutoModelForImageTextToText

    from cascadevlm.clip.model import load_clip

    out = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "cascadevlm.zoo.pretrain", "--out", str(out), "--clip-steps", "2",
           "--vision-steps", "2", "--lvlm-steps", "2", "--small-vision-steps", "2", "--small-lvlm-steps", "2",
           "--train-limit", "300", "--val-limit", "60",
           "--data-root", str(data_root)]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"].endswith("--data-root " + str(data_root)) and m["seed"] == 0
    assert set(m["files"]) >= {"clip.safetensors", "llava/config.json", "llava/cascadevlm_provenance.json"}
    assert load_clip(CLIP_MODEL, str(out / "clip.safetensors")).provenance["kind"] == "trained-demo"
    for d in ("llava", "llava_small"):
        AutoModelForImageTextToText.from_pretrained(out / d)
        assert read_provenance(out / d)["kind"] == "trained-demo"
        assert f"{d}/model.safetensors" in m["files"]
    checks = m["lvlm_small"]["val_most_uncertain_30pct"]
    assert {"lvlm_acc_registry", "lvlm_acc_official", "lvlm_acc_upper", "lvlm_acc_letters"} <= set(checks)
    assert m["lvlm_training_names"]["held_out"] == [] and "upper" in m["lvlm_training_names"]["schemes"]
