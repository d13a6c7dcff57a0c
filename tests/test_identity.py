"""What identifies CLIP features: precision, weights content (checkpoint, local-dir, hf-hub), model config."""

from __future__ import annotations

import json
import shutil

import lightning as L
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from cascadevlm.clip.adapters import AdapterMismatchError, LinearProbe, load_adapter, save_adapter
from cascadevlm.clip.features import FeatureCache, image_features, split_feature_key
from cascadevlm.clip.model import MODEL_CONFIG_DIR, load_clip, weights_id
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.zoo.tiny_clip import TINY_CLIP


@pytest.fixture(scope="module")
def fmnist(data_root):
    dm = CascadeDataModule("fashion_mnist", data_root=str(data_root), limit=120, batch_size=60)
    return dm


def _predict_top1(module: ClipClassifier, dm: CascadeDataModule, precision: str = "32-true") -> dict:
    dm.transform = module.preprocess
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    out = trainer.predict(module, dataloaders=dm.image_dataloader())
    return {
        "top1": torch.cat([o["topk_ids"][:, 0] for o in out]),
        "features": torch.cat([o["features"] for o in out]),
        "entropy": torch.cat([o["entropy"] for o in out]),
    }


# ------------------------------------------------------------------------------ precision (items 1, 2)
def test_fp32_and_bf16_features_never_serve_each_other(tiny_clip_path, fmnist, tmp_path):
    ds = fmnist.eval_dataset()
    cache = FeatureCache(tmp_path / "features")
    fp32 = load_clip(TINY_CLIP, str(tiny_clip_path), precision="fp32")
    bf16 = load_clip(TINY_CLIP, str(tiny_clip_path), precision="bf16")
    assert split_feature_key(fp32, ds, "test") != split_feature_key(bf16, ds, "test")
    f32 = image_features(fp32, ds, "test", cache)
    b16 = image_features(bf16, ds, "test", cache)  # computed in bf16, not the fp32 run's cached rows
    assert not torch.equal(f32, b16)
    assert torch.equal(image_features(bf16, ds, "test", cache), b16)  # its own cache entry
    assert torch.equal(image_features(fp32, ds, "test", cache), f32)
    assert len(list(cache.root.glob("*.safetensors"))) == 2


def test_bf16_and_fp16_models_compute_features_close_to_fp32(tiny_clip_path, fmnist):
    ref = _predict_top1(
        ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=fmnist.class_names), fmnist
    )
    low = ClipClassifier(TINY_CLIP, str(tiny_clip_path), precision="bf16", class_names=fmnist.class_names)
    got = _predict_top1(low, fmnist)
    cos = torch.nn.functional.cosine_similarity(got["features"], ref["features"]).min()
    agree = float((got["top1"] == ref["top1"]).float().mean())
    assert cos > 0.98 and agree >= 0.9, (float(cos), agree)
    # fp16 on the CPU is slow: a few images through the adapters' feature path.
    few = fmnist.eval_dataset().select(range(16))
    f16 = image_features(load_clip(TINY_CLIP, str(tiny_clip_path), precision="fp16"), few, "test")
    assert torch.nn.functional.cosine_similarity(f16, ref["features"][:16]).min() > 0.98


def test_trainer_autocast_does_not_change_clip_stage_numbers(tiny_clip_path, fmnist):
    """The CLIP stage computes in model.precision; trainer.precision (bf16-mixed) changes nothing, so the
    feature-cache key (which holds model.precision) describes the features either way."""
    module = ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=fmnist.class_names)
    ref = _predict_top1(module, fmnist)
    mixed = _predict_top1(module, fmnist, precision="bf16-mixed")
    assert torch.equal(mixed["features"], ref["features"]) and torch.equal(mixed["entropy"], ref["entropy"])


def test_adapter_training_features_in_bf16(tiny_clip_path, data_root, tmp_path):
    from cascadevlm.clip.adapters import KShotFeatureDataModule

    feats = {}
    for precision in ("fp32", "bf16"):
        dm = KShotFeatureDataModule("fashion_mnist", shots=2, seed=1, val_limit=20, test_split=None,
                                    data_root=str(data_root), cache_dir=str(tmp_path / "f"),
                                    splits_dir=str(tmp_path / "s"))  # fmt: skip
        dm.attach_bundle(load_clip(TINY_CLIP, str(tiny_clip_path), precision=precision))
        dm.setup("fit")
        feats[precision] = dm.features["val"]
    cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"])
    assert not torch.equal(feats["fp32"], feats["bf16"]) and cos.min() > 0.98


def test_unknown_precision_is_refused(tiny_clip_path):
    with pytest.raises(ValueError, match=r"^unknown CLIP precision 'bf32'; use one of fp32, fp16, bf16, amp"):
        load_clip(TINY_CLIP, str(tiny_clip_path), precision="bf32")


# ------------------------------------------------------------------------------ weights identity (item 3)
def _save_local_dir(directory, seed: int, model_name: str = TINY_CLIP):
    """An open_clip ``local-dir:`` model: open_clip_config.json + open_clip_model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((MODEL_CONFIG_DIR / f"{model_name}.json").read_text())
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "open_clip_model.safetensors"),
    )
    return f"local-dir:{directory}"


def test_local_dir_weights_are_identified_by_content(tiny_clip_bundle, fmnist, tmp_path):
    load_clip(TINY_CLIP)  # registers the project's configs
    name = _save_local_dir(tmp_path / "clip", seed=1)
    a = load_clip(name)
    assert a.weights_id.startswith("sha256-dir:") and a.provenance is None
    ds = fmnist.eval_dataset()
    key_a = split_feature_key(a, ds, "test")
    # An adapter trained on these weights.
    head = torch.nn.functional.normalize(torch.randn(len(fmnist.class_names), a.embed_dim), dim=-1)
    adapter = save_adapter(tmp_path / "probe.safetensors", LinearProbe(head, 100.0), model_name=name,
                           weights_id=a.weights_id, class_names=fmnist.class_names, logit_scale=100.0,
                           embed_dim=a.embed_dim)  # fmt: skip
    load_adapter(adapter, a, fmnist.class_names)
    # New weights in the same folder: a new id, a new feature key, and the adapter is refused.
    _save_local_dir(tmp_path / "clip", seed=2)
    b = load_clip(name)
    assert b.weights_id != a.weights_id and split_feature_key(b, ds, "test") != key_a
    with pytest.raises(AdapterMismatchError, match="weights_id: adapter 'sha256-dir:"):
        load_adapter(adapter, b, fmnist.class_names)
    # Any new file in the folder changes the id; our own provenance mark does not.
    (tmp_path / "clip" / "extra.bin").write_bytes(b"x")
    c_id = weights_id(None, name)
    assert c_id != b.weights_id
    from cascadevlm.provenance import write_provenance

    write_provenance(tmp_path / "clip", {"kind": "trained-demo", "description": "demo"})
    assert weights_id(None, name) == c_id and load_clip(name).provenance["kind"] == "trained-demo"


def test_hf_hub_model_not_in_the_local_cache_is_identified_by_name():
    assert weights_id(None, "hf-hub:nobody/no-such-clip") == "hf-hub:nobody/no-such-clip@unresolved"


def test_custom_architecture_from_a_model_config_json(tmp_path, fmnist):
    cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY_CLIP}.json").read_text())
    cfg["vision_cfg"]["layers"] = 1
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    bundle = load_clip("my-arch", model_config=str(path))
    assert len(bundle.model.visual.transformer.resblocks) == 1
    ref = load_clip(TINY_CLIP)
    assert split_feature_key(bundle, fmnist.eval_dataset(), "t") != split_feature_key(
        ref, fmnist.eval_dataset(), "t"
    )
    with pytest.raises(ValueError) as err:
        load_clip("other-arch", model_config=str(path))
    assert str(err.value) == (
        f"model config {str(path)!r} defines architecture 'my-arch' (open_clip names a config by its file name) "
        "but model_name is 'other-arch'; set --model.model_name my-arch"
    )
    shutil.copy(path, tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \['embed_dim', 'vision_cfg', 'text_cfg'\]"):
        load_clip("bad", model_config=str(tmp_path / "bad.json"))
