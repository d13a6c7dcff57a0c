"""Tip-Adapter(-F), CLIP-Adapter, WiSE-FT-style mixing, the k-shot selection protocol and the kind registry.

Learning is checked on the demo's trained CLIP (cascadevlm/zoo/checkpoints) with real Fashion-MNIST photos:
accuracy on held-out test images (never used for training or selection) above zero-shot CLIP's.
"""

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from adapter_fixtures import fit, kshot_features

from cascadevlm.clip.adapters import (
    AdapterMismatchError,
    ClipAdapterHead,
    ClipAdapterModule,
    KShotFeatureDataModule,
    LinearProbe,
    TipAdapterFModule,
    TipAdapterHead,
    TipAdapterModule,
    WiseHead,
    adapter_info,
    adapter_kinds,
    adapter_metadata,
    load_adapter,
    register_adapter_kind,
    save_adapter,
)
from cascadevlm.clip.adapters.base import ADAPTER_KINDS, METHOD_OF_KIND
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.zoo.miniature import CLIP_CHECKPOINT, CLIP_MODEL
from cascadevlm.zoo.tiny_clip import TINY_CLIP

SHOTS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_bundle():
    return load_clip(CLIP_MODEL, str(CLIP_CHECKPOINT))


@pytest.fixture(scope="module")
def data(demo_bundle, data_root, tmp_path_factory):
    """16 shots of Fashion-MNIST, a validation set of the same size (selection=val), 200 test photos."""
    work = tmp_path_factory.mktemp("tip")
    return kshot_features(
        demo_bundle, data_root, work, shots=SHOTS, selection="val", test_limit=200, batch_size=16
    )


@pytest.fixture(scope="module")
def zero_shot(demo_bundle, data):
    b = demo_bundle
    head = build_zero_shot_head(b.model, b.tokenizer, data.class_names, data.templates)
    return head, float(b.model.logit_scale.exp())


def _module(cls, dm, **kw):
    return cls(
        model_name=CLIP_MODEL,
        pretrained=str(CLIP_CHECKPOINT),
        class_names=dm.class_names,
        templates=dm.templates,
        log_confusion_matrix=False,
        **kw,
    )


def _tip_head(data, zero_shot, alpha, beta, train_keys=False):
    head, scale = zero_shot
    tip = TipAdapterHead(head, scale, alpha=alpha, beta=beta, train_keys=train_keys)
    tip.set_cache(data.features["train"], torch.tensor(data.targets["train"]))
    return tip


# ------------------------------------------------------------------------------ zero-shot at initialisation
def test_each_method_at_its_zero_setting_gives_zero_shot_logits_exactly(data, zero_shot):
    head, scale = zero_shot
    feats = data.features["test"]
    expected = clip_logits(feats, head, scale)
    tip = _tip_head(data, zero_shot, alpha=0.0, beta=5.0)
    assert tip.cache_size == 10 * SHOTS and tip.cache_logits(F.normalize(feats)).abs().sum() > 0
    torch.manual_seed(0)
    clip_adapter = ClipAdapterHead(head, scale, ratio=0.0)  # a random MLP, weighted 0
    probe = LinearProbe(head, scale)
    with torch.no_grad():
        probe.weight.add_(0.1 * torch.randn_like(probe.weight))
        probe.bias.add_(1.0)
        for name, got in {
            "tip_adapter": tip(feats),
            "clip_adapter": clip_adapter(feats),
            "wise_0": WiseHead(probe, head, scale, 0.0)(feats),
        }.items():
            assert torch.equal(got, expected), name
        # and away from zero they are not zero-shot
        assert not torch.equal(_tip_head(data, zero_shot, 1.0, 5.0)(feats), expected)
        assert not torch.equal(ClipAdapterHead(head, scale, ratio=0.5)(feats), expected)


def test_tip_adapter_logits_follow_the_papers_formula(data, zero_shot):
    head, scale = zero_shot
    tip = _tip_head(data, zero_shot, alpha=1.7, beta=5.5)
    f = F.normalize(data.features["test"][:7], dim=-1)
    keys = F.normalize(data.features["train"], dim=-1)
    values = F.one_hot(torch.tensor(data.targets["train"]), 10).float()
    expected = scale * f @ head.T + 1.7 * torch.exp(-5.5 * (1 - f @ keys.T)) @ values
    with torch.no_grad():
        torch.testing.assert_close(tip(data.features["test"][:7]), expected, rtol=1e-5, atol=1e-5)


def test_wise_mix_interpolates_logits_and_is_the_adapter_at_1(data, zero_shot):
    head, scale = zero_shot
    tip = _tip_head(data, zero_shot, alpha=2.0, beta=5.0)
    feats = data.features["test"]
    with torch.no_grad():
        assert torch.equal(WiseHead(tip, head, scale, 1.0)(feats), tip(feats))
        mixed = WiseHead(tip, head, scale, 0.25)(feats)
        torch.testing.assert_close(mixed, 0.75 * clip_logits(feats, head, scale) + 0.25 * tip(feats))


# ------------------------------------------------------------------------------ learning on real photos
@pytest.mark.parametrize(
    "cls, kw, epochs",
    [
        # training-free: stops after its one validated epoch. One plain view: on the demo's 28-pixel
        # photos the paper's crop augmentation costs accuracy (docs/methods.md has the numbers)
        (TipAdapterModule, {"views": 1, "augment": "none"}, 3),
        (TipAdapterFModule, {"lr": 1e-3}, 8),
        (ClipAdapterModule, {"lr": 1e-2}, 8),
    ],
    ids=["tip_adapter", "tip_adapter_f", "clip_adapter"],
)
def test_each_method_beats_zero_shot_on_held_out_photos(cls, kw, epochs, data, tmp_path):
    L.seed_everything(0)
    module = _module(cls, data, **kw)
    trainer = fit(module, data, tmp_path, epochs, test=True)
    # test_acc: the exported checkpoint on 200 test photos used neither for training nor for selection
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_size"] == 200
    assert metrics["test_acc"] >= metrics["zero_shot_test_acc"] + 0.03, metrics
    with torch.no_grad():  # and the file evaluate.py loads gives the same accuracy
        head = load_adapter(tmp_path / "adapter.safetensors", data.bundle, data.class_names)
        acc = float(
            (head(data.features["test"]).argmax(-1) == torch.tensor(data.targets["test"])).float().mean()
        )
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-6)
    info = adapter_info(tmp_path / "adapter.safetensors")
    assert (info["method"], info["shots"], info["seed"], info["selection"]) == (
        module.method,
        SHOTS,
        1,
        "val",
    )
    assert metrics["selection"] == "val"
    if cls is TipAdapterModule:
        assert trainer.current_epoch == 1 and trainer.global_step == 0  # no optimiser step, one epoch
        params = adapter_metadata(tmp_path / "adapter.safetensors")["params"]
        assert params["search"]["on"] == "kshot_val" and params["search"]["size"] == 10 * SHOTS
        assert params["alpha"] > 0  # the search found the cache useful on validation
    if cls is TipAdapterFModule:  # the keys moved away from the k-shot features
        keys = load_adapter(tmp_path / "adapter.safetensors", data.bundle, data.class_names).keys
        assert not torch.allclose(keys, F.normalize(data.features["train"], dim=-1))


def test_tip_adapter_search_picks_the_best_grid_point_on_validation(data, zero_shot):
    tip = _tip_head(data, zero_shot, alpha=1.0, beta=1.0)
    feats, labels = data.features["val"], torch.tensor(data.targets["val"])
    alphas, betas = [0.0, 0.5, 1.0, 2.0, 4.0], [1.0, 3.0, 5.0, 9.0]
    alpha, beta, acc = tip.search_alpha_beta(feats, labels, alphas, betas)
    assert (tip.alpha, tip.beta) == (alpha, beta)  # the head keeps what it found
    brute = {}
    for b in betas:
        for a in alphas:
            tip.alpha, tip.beta = a, b
            with torch.no_grad():
                brute[(a, b)] = float((tip(feats).argmax(-1) == labels).float().mean())
    assert acc == max(brute.values()) == brute[(alpha, beta)]
    # ties go to the first grid point (betas outer, alphas inner)
    assert (alpha, beta) == next(k for k in sorted(brute, key=lambda ab: (ab[1], ab[0])) if brute[k] == acc)


# ------------------------------------------------------------------------------ save / load / refuse
@pytest.fixture(scope="module")
def saved(data, demo_bundle, tmp_path_factory):
    """A Tip-Adapter-F file (trained-looking keys) and a CLIP-Adapter file, with their live modules."""
    root = tmp_path_factory.mktemp("saved")
    tip = _module(TipAdapterFModule, data)
    tip.build_cache(data.features["train"], torch.tensor(data.targets["train"]))
    tip.search_on(data.features["val"], torch.tensor(data.targets["val"]), "kshot_val")
    torch.manual_seed(0)
    clip_adapter = _module(ClipAdapterModule, data, ratio=0.3)
    with torch.no_grad():
        tip.adapter.keys.add_(0.05 * torch.randn_like(tip.adapter.keys))
    out = {}
    for name, module in (("tip_adapter_f", tip), ("clip_adapter", clip_adapter)):
        out[name] = (module.eval(), module.save_adapter(root / f"{name}.safetensors"))
    return out


@pytest.mark.parametrize("name", ["tip_adapter_f", "clip_adapter"])
def test_saved_adapter_reloads_with_identical_logits_also_in_the_clip_stage(name, saved, data, demo_bundle):
    module, path = saved[name]
    feats = data.features["test"]
    with torch.no_grad():
        expected = module(feats)
        assert torch.equal(load_adapter(path, demo_bundle, data.class_names)(feats), expected)
        clf = ClipClassifier(CLIP_MODEL, str(CLIP_CHECKPOINT), class_names=data.class_names,
                             templates=data.templates, adapter=str(path))  # fmt: skip
        clf.ensure_head()
        assert torch.equal(clf.logits(feats), expected)
        # WiSE-FT-style mixing in the CLIP stage: --model.adapter_mix
        half = ClipClassifier(CLIP_MODEL, str(CLIP_CHECKPOINT), class_names=data.class_names,
                              templates=data.templates, adapter=str(path), adapter_mix=0.5)  # fmt: skip
        zs = clip_logits(feats, half.ensure_head(), half.clip.logit_scale.exp())
        torch.testing.assert_close(half.logits(feats), 0.5 * zs + 0.5 * expected)
        none = ClipClassifier(CLIP_MODEL, str(CLIP_CHECKPOINT), class_names=data.class_names,
                              templates=data.templates, adapter=str(path), adapter_mix=0.0)  # fmt: skip
        none.ensure_head()
        assert torch.equal(none.logits(feats), zs)
    assert adapter_info(path)["method"] == name and adapter_metadata(path)["kind"] == module.adapter.kind


@pytest.mark.parametrize("name", ["tip_adapter_f", "clip_adapter"])
def test_adapter_for_other_weights_model_or_classes_is_refused(name, saved, data, tiny_clip_bundle, tmp_path):
    _, path = saved[name]
    with pytest.raises(AdapterMismatchError, match=r"weights_id: adapter 'sha256:[0-9a-f]{64}', loaded CLIP"):
        load_adapter(path, bundle=tiny_clip_bundle, class_names=data.class_names)  # same model, other weights
    other = SimpleNamespace(model_name="ViT-B-32", weights_id="x", embed_dim=512, model=None)
    with pytest.raises(
        AdapterMismatchError, match="model_name: adapter 'cascadevlm-tiny-vit', loaded CLIP 'ViT-B-32'"
    ):
        load_adapter(path, bundle=other, class_names=data.class_names)
    with pytest.raises(AdapterMismatchError, match="embed_dim: adapter 64, loaded CLIP 512"):
        load_adapter(path, bundle=other, class_names=data.class_names)
    with pytest.raises(AdapterMismatchError, match="the same classes in a different order"):
        load_adapter(path, bundle=data.bundle, class_names=data.class_names[::-1])


# ------------------------------------------------------------------------------ selection protocol
def test_selection_val_draws_a_kshot_sized_validation_set_disjoint_from_the_kshot_images(data):
    val_rows = data.kshot_val_indices()
    assert len(val_rows) == len(data.features["val"]) == len(data.features["train"]) == 10 * SHOTS
    assert not set(val_rows) & set(data._kshot_split().all_indices)
    labels = data.targets["val"]
    assert all(labels.count(c) == SHOTS for c in range(10))
    assert data.kshot_val_indices() == val_rows  # reproducible for (k, seed)
    assert data.run_name("tip_adapter") == ("fashion_mnist_tip_adapter", f"k{SHOTS}_seed1_selval")


def test_selection_last_exports_the_last_epoch_and_records_it(data, data_root, demo_bundle, tmp_path):
    dm = KShotFeatureDataModule("fashion_mnist", shots=SHOTS, seed=1, selection="last", val_limit=50, test_split=None,
                                data_root=str(data_root), cache_dir=str(tmp_path / "f"), splits_dir=str(tmp_path / "s"))  # fmt: skip
    dm.attach_bundle(demo_bundle)
    L.seed_everything(0)
    module = _module(ClipAdapterModule, dm, lr=0.05)
    trainer = fit(module, dm, tmp_path, 3, test=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["selection"] == "last" and metrics["epoch"] == 2 == trainer.current_epoch - 1
    assert adapter_info(tmp_path / "adapter.safetensors")["selection"] == "last"
    assert (
        trainer.checkpoint_callback.last_model_path.endswith("last.ckpt")
        or (tmp_path / "checkpoints" / "last.ckpt").exists()
    )
    with torch.no_grad():  # the file is the final weights, whatever the validation accuracy did
        saved = load_adapter(tmp_path / "adapter.safetensors", demo_bundle, dm.class_names)
        assert torch.equal(saved(dm.features["val"]), module.adapter.eval()(dm.features["val"]))
    # Tip-Adapter with selection=last: nothing chosen on validation data, alpha and beta as given
    tip = _module(TipAdapterModule, dm, alpha=0.7, beta=3.0)
    fit(tip, dm, tmp_path / "tip", 1, test=True)
    params = adapter_metadata(tmp_path / "tip" / "adapter.safetensors")["params"]
    assert (params["alpha"], params["beta"], params["search"]) == (0.7, 3.0, {})


def test_bad_selection_options_are_refused_in_one_line(data_root):
    with pytest.raises(
        ValueError, match=r"data.selection must be one of \('val_split', 'val', 'last'\), got 'best'"
    ):
        KShotFeatureDataModule("fashion_mnist", selection="best", data_root=str(data_root))
    with pytest.raises(ValueError, match="set --data.val_limit null"):
        KShotFeatureDataModule("fashion_mnist", selection="val", val_limit=100, data_root=str(data_root))


# ------------------------------------------------------------------------------ WiSE option
def test_adapter_mix_out_of_range_or_without_adapter_is_refused(tiny_clip_path):
    for bad in (-0.1, 1.5):
        with pytest.raises(
            ValueError, match=rf"model.adapter_mix must be in \[0, 1\] .* got {bad}: set --model.adapter_mix"
        ):
            ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=["a", "b"], adapter="x.safetensors", adapter_mix=bad)  # fmt: skip
    with pytest.raises(
        ValueError, match="no adapter is set: set --model.adapter or leave --model.adapter_mix at 1"
    ):
        ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=["a", "b"], adapter_mix=0.5)


def test_adapter_mix_and_selection_are_in_the_run_name_and_the_table_label(saved, data, tmp_path):
    from cascadevlm.cascade.evaluate import CascadeOptions, default_run_name
    from cascadevlm.report.tables import collect_results

    module, _ = saved["clip_adapter"]
    b = module.bundle
    path = save_adapter(tmp_path / "a.safetensors", module.adapter, model_name=b.model_name, weights_id=b.weights_id,
                        class_names=data.class_names, logit_scale=module.logit_scale, embed_dim=b.embed_dim,
                        method="clip_adapter", shots=SHOTS, seed=1, selection="val")  # fmt: skip
    dm = SimpleNamespace(
        name="fashion_mnist", split="test", shots=0, seed=1, limit=None, class_names=data.class_names
    )

    def name(mix):
        hp = SimpleNamespace(model_name=CLIP_MODEL, pretrained="/w/c.safetensors", precision="fp32", adapter=str(path),
                             adapter_mix=mix)  # fmt: skip
        return default_run_name(dm, SimpleNamespace(hparams=hp, templates=["{}"]), None, CascadeOptions())

    assert "mix0.5" in name(0.5) and "mix" not in name(1.0) and name(0.5) != name(0.25)
    assert f"clip_adapter_k{SHOTS}_s1_selval" in name(1.0)  # method, k, seed and selection from the file
    run = tmp_path / "run"
    run.mkdir()
    params = {"dataset": "fashion_mnist", "shots": 8, "seed": 1, "adapter_method": "clip_adapter",
              "adapter_selection": "val", "adapter_mix": 0.5}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps({"params": params, "methods": {"clip": {"acc1": 0.5}}}))
    assert collect_results([run])[0]["method"] == "clip (clip_adapter, selection val, mix 0.5)"


# ------------------------------------------------------------------------------ the kind registry
def test_a_registered_kind_saves_and_loads_through_load_adapter(demo_bundle, data, zero_shot, tmp_path):
    head, scale = zero_shot

    class Scaled(LinearProbe):
        kind = "test_scaled"

    try:
        register_adapter_kind("test_scaled", "scaled_probe", lambda f: ("loaded", f.params, f.class_names))
        assert {"linear_probe", "prompt_tuning", "tip_adapter", "clip_adapter", "test_scaled"} <= set(
            adapter_kinds()
        )
        path = save_adapter(tmp_path / "s.safetensors", Scaled(head, scale), model_name=CLIP_MODEL,
                            weights_id=demo_bundle.weights_id, class_names=data.class_names, logit_scale=scale,
                            embed_dim=64)  # fmt: skip
        assert adapter_info(path)["method"] == "scaled_probe"  # the kind's method when the file names none
        assert load_adapter(path, demo_bundle, data.class_names) == (
            "loaded",
            {"blend": 0.0},
            data.class_names,
        )
    finally:
        ADAPTER_KINDS.pop("test_scaled", None)
        METHOD_OF_KIND.pop("test_scaled", None)
    with pytest.raises(ValueError, match="unknown kind 'test_scaled'"):
        load_adapter(path, demo_bundle, data.class_names)


# ------------------------------------------------------------------------------ the papers' recipes
def test_tip_adapter_f_trains_at_the_fixed_initial_alpha_then_searches_even_when_a_first_search_gives_0(
    data, tmp_path
):
    """Issue 20: a search before training that returns alpha = 0 multiplied the cache by 0, the keys got
    no gradient and "Tip-Adapter-F" exported zero-shot CLIP. The paper trains at fixed alpha/beta first."""
    L.seed_everything(0)
    # a grid whose alphas are too small to change any prediction: a first search ties and returns 0
    module = _module(TipAdapterFModule, data, lr=1e-3, views=1, augment="none", alpha_max=1e-7, alpha_steps=1)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.adapter.alpha, pl_module.adapter.beta))

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                        callbacks=[Spy()])  # fmt: skip
    trainer.fit(module, datamodule=data)
    scale = module.logit_scale
    assert seen and all(a == pytest.approx(1.17 * scale / 100) and b == 1.0 for a, b in seen)  # s/100 units
    saved = load_adapter(tmp_path / "adapter.safetensors", data.bundle, data.class_names)
    assert not torch.allclose(saved.keys, F.normalize(data.features["train"], dim=-1))  # the keys learned
    params = adapter_metadata(tmp_path / "adapter.safetensors")["params"]
    assert params["search"]["on"] == "kshot_val"  # searched once, after training, for the file
    assert params["cache_from"] == {"views": 1, "augment": "none"}  # how the keys were made, in the file


def test_tip_adapter_f_whose_keys_cannot_move_is_refused_not_exported(data, tmp_path):
    module = _module(TipAdapterFModule, data, lr=0.0, views=1, augment="none")
    with pytest.raises(ValueError, match="the cache keys did not move in training .* refusing to export it"):
        fit(module, data, tmp_path, 1)
    assert not (tmp_path / "adapter.safetensors").exists()


def test_the_alpha_search_widens_its_grid_when_the_best_alpha_is_its_top(data, caplog):
    tip = _module(TipAdapterModule, data, views=1, augment="none", alpha_max=2.0)
    tip.build_cache(data.features["train"], torch.tensor(data.targets["train"]))
    feats, labels = data.features["val"], torch.tensor(data.targets["val"])
    with caplog.at_level("INFO", logger="cascadevlm.clip.adapters.tip_adapter"):
        tip.search_on(feats, labels, "kshot_val")
    search = tip.adapter.search
    assert search["widened"] >= 1 and search["alpha_top"] == 2.0 * 2 ** search["widened"]
    assert (
        "the best alpha on kshot_val is the top of the grid (2); widening the grid to [0, 4]" in caplog.text
    )
    # the widened search is the plain search over the widened grid
    top = search["alpha_top"]
    ref = TipAdapterHead(tip.adapter.zero_shot_weight, tip.logit_scale)
    ref.set_cache(data.features["train"], torch.tensor(data.targets["train"]))
    betas = [7.0 * i / 35 for i in range(1, 36)]
    assert ref.search_alpha_beta(feats, labels, [top * i / 30 for i in range(31)], betas) == (
        tip.adapter.alpha, tip.adapter.beta, search["acc"],
    )  # fmt: skip
    assert tip.adapter.alpha < top  # it stopped widening once the optimum was inside


def test_the_augmented_cache_keys_are_the_mean_of_the_views_computed_one_by_one(
    data, demo_bundle, monkeypatch
):
    from cascadevlm.clip.adapters import augment as aug
    from cascadevlm.clip.model import encode_images

    tip = _module(TipAdapterModule, data, views=3)
    views = tip.view_features(data)  # [3, N, D], cached per image and view
    rows = data._kshot_split().all_indices
    ds = data.source.dsd["train"]
    transform = aug.augment_transform(demo_bundle.preprocess, "flip_crop")
    one_by_one = torch.stack([
        torch.stack([
            encode_images(demo_bundle, aug.AugmentedImages(ds, transform, "train", [r], view=v)[0]["pixel_values"][None])[0]
            for r in rows[:5]
        ])
        for v in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(views[:, :5], one_by_one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(views[0], views[1])  # the views differ: augmentation happened
    plain = data.features["train"][:5]
    assert not torch.allclose(views[0, :5], plain)
    tip.build_cache(views.mean(dim=0), torch.tensor(data.targets["train"]))
    torch.testing.assert_close(tip.adapter.keys[:5], F.normalize(one_by_one.mean(dim=0), dim=-1))
    # a second request (another method or seed with the same images) encodes nothing
    monkeypatch.setattr("cascadevlm.clip.model.encode_images", lambda *a: pytest.fail("encoded again"))
    again = aug.augmented_features(
        demo_bundle, ds, rows[:5], "train", 3, "flip_crop", aug.cache_root_of(data.cache)
    )
    assert torch.equal(again, views[:, :5])


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"recipe": "fancy"},
            r"tip_adapter has no recipe 'fancy'; known: \['paper', 'plain_cache'\]: set --model.recipe",
        ),
        ({"views": 0}, r"needs views >= 1 \(images seen per k-shot image\), got 0: set --model.views"),
        ({"views": 4, "augment": "none"}, "4 views without augmentation are 4 copies of one view"),
        (
            {"augment": "mixup"},
            r"augmentation 'mixup' is unknown; choose one of \['none', 'flip_crop', 'flip_crop_wide'\]",
        ),
        ({"alpha": 0.0, "train": True}, "alpha = 0 multiplies by 0 .* set --model.alpha > 0"),
    ],
    ids=["recipe", "views", "copies", "augment", "f_alpha0"],
)
def test_bad_tip_adapter_options_are_refused_before_any_work(kw, message):
    kw = dict(kw)
    cls = TipAdapterFModule if kw.pop("train", False) else TipAdapterModule
    with pytest.raises(ValueError, match=message):
        cls(model_name="no-such-model-is-loaded", **kw)  # refused before the model is even looked up


def test_a_recipe_other_than_the_papers_names_its_runs(data):
    assert _module(TipAdapterModule, data).method == "tip_adapter"
    assert _module(TipAdapterModule, data, recipe="plain_cache").method == "tip_adapter_plain_cache"
    assert _module(TipAdapterFModule, data, recipe="plain_cache").method == "tip_adapter_f_plain_cache"


@pytest.mark.parametrize("method", ["clip_lora", "tip_adapter", "tip_adapter_f", "coop", "clip_adapter"])
def test_the_python_defaults_are_the_method_files(method):
    """A module built from Python gets the recipe train.py gets from configs/method/<method>.yaml (options
    a recipe resolves, None in the signature, compared as resolved)."""
    import importlib
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "method" / f"{method}.yaml").read_text())
    module_name, _, name = cfg["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    module = cls(model_name=CLIP_MODEL, pretrained=str(CLIP_CHECKPOINT))
    own = {k: v for k, v in cfg["model"]["init_args"].items() if k not in ("model_name", "pretrained")}
    resolved = {k: vars(module)[k] if k in vars(module) else module.hparams[k] for k in own}
    assert resolved == own


def _lrs(module, steps: int, epochs: int) -> list[float]:
    """The learning rate of each optimiser step under the module's own schedule."""
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(estimated_stepping_batches=steps, max_epochs=epochs)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_coop_warms_up_one_epoch_at_a_constant_1e_5_then_follows_a_cosine(data):
    from cascadevlm.clip.adapters import PromptTuningModule

    coop = _module(PromptTuningModule, data)  # the paper's recipe: SGD lr 2e-3, warm-up lr 1e-5
    assert (coop.hparams.optimizer, coop.hparams.lr, coop.hparams.warmup_lr) == ("sgd", 2e-3, 1e-5)
    lrs = _lrs(coop, steps=50, epochs=10)  # 5 steps an epoch
    assert lrs[:5] == [pytest.approx(1e-5)] * 5  # Dassl's ConstantWarmupScheduler, one epoch
    cosine = [2e-3 * 0.5 * (1 + math.cos(math.pi * i / 45)) for i in range(45)]
    assert lrs[5:] == pytest.approx(cosine)
    linear = _lrs(_module(PromptTuningModule, data, recipe="linear_warmup", warmup_steps=4), 50, 10)
    assert linear[:4] == pytest.approx([2e-3 * (i + 1) / 5 for i in range(4)])  # the earlier ramp
    with pytest.raises(ValueError, match="warmup_steps=4 is the linear_warmup recipe's"):
        _module(PromptTuningModule, data, warmup_steps=4)


def test_clip_lora_decays_its_learning_rate_by_a_cosine_to_1e_6():
    from cascadevlm.clip.adapters import ClipLoraModule

    lora = ClipLoraModule(
        CLIP_MODEL, str(CLIP_CHECKPOINT), class_names=["a", "b"], log_confusion_matrix=False
    )
    lrs = _lrs(lora, steps=100, epochs=-1)
    expected = [1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * i / 100)) for i in range(100)]
    assert lrs == pytest.approx(expected)  # torch's CosineAnnealingLR(T_max=steps, eta_min=1e-6), per step
