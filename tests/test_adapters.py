"""Few-shot CLIP adapters: reference equivalences, learning on real photos, save/load, mismatches, reports."""

import json

import pytest
import torch
import torch.nn.functional as F
from adapter_fixtures import fit, kshot_features
from safetensors.torch import save_file

from cascadevlm.clip.adapters import (
    AdapterMismatchError,
    FrozenTextEncoder,
    LinearProbe,
    LinearProbeModule,
    PromptLearner,
    PromptTuningModule,
    adapter_info,
    adapter_metadata,
    class_names_sha256,
    load_adapter,
    save_adapter,
)
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.report.kshot import aggregate, collect_runs
from cascadevlm.report.kshot import main as kshot_main
from cascadevlm.zoo.tiny_clip import TINY_CLIP, build_tiny_clip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kshot_data(tiny_clip_bundle, data_root, tmp_path_factory):
    """A 4-shot split of Fashion-MNIST (40 real photos) and 200 val photos, as tiny-CLIP features."""
    work = tmp_path_factory.mktemp("kshot")
    return kshot_features(
        tiny_clip_bundle, data_root, work, shots=4, val_limit=200, test_split=None, batch_size=16
    )


def _module(cls, tiny_clip_path, dm, **kw):
    return cls(
        model_name=TINY_CLIP,
        pretrained=str(tiny_clip_path),
        class_names=dm.class_names,
        templates=dm.templates,
        log_confusion_matrix=False,
        **kw,
    )


def _train_xy(dm):
    return dm.features["train"], torch.tensor(dm.targets["train"])


# ------------------------------------------------------------------------------ reference equivalences
def test_untrained_linear_probe_gives_zero_shot_logits(tiny_clip_path, tiny_clip_bundle, kshot_data):
    module = _module(LinearProbeModule, tiny_clip_path, kshot_data)
    b = tiny_clip_bundle
    head = build_zero_shot_head(b.model, b.tokenizer, kshot_data.class_names, kshot_data.templates)
    feats = kshot_data.features["val"]
    expected = clip_logits(feats, head, b.model.logit_scale.exp())
    with torch.no_grad():
        got = module(feats)
    assert got.shape == (200, 10)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("class_specific", [False, True])
def test_prompt_context_from_a_photo_of_a_matches_encode_text(tiny_clip_bundle, class_specific):
    b = tiny_clip_bundle
    names = ["t-shirt", "ankle boot", "Boeing 737-800", "Black-footed Albatross", "crème brûlée", "dog"]
    learner = PromptLearner(
        FrozenTextEncoder(b.model), b.tokenizer, names, ctx_init="a photo of a", class_specific=class_specific
    )
    assert learner.n_ctx == 4
    assert tuple(learner.ctx.shape) == ((6, 4, 64) if class_specific else (4, 64))
    with torch.no_grad():
        got = learner()
        expected = b.model.encode_text(b.tokenizer([f"a photo of a {c}." for c in names]), normalize=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_only_the_context_is_trainable(tiny_clip_path, kshot_data):
    module = _module(PromptTuningModule, tiny_clip_path, kshot_data)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["adapter.ctx"]


# ------------------------------------------------------------------------------ learning
def _loss_acc(module, dm):
    x, y = _train_xy(dm)
    module.eval()
    with torch.no_grad():
        logits = module(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


@pytest.mark.parametrize(
    "cls, kw, epochs",
    [
        (LinearProbeModule, {"lr": 0.03, "weight_decay": 1e-4}, 40),
        # AdamW, no warm-up: the learning signal, not CoOp's SGD recipe (the default)
        (PromptTuningModule, {"lr": 0.01, "class_specific": True, "optimizer": "adamw", "weight_decay": 0.0,
                              "recipe": "linear_warmup"}, 40),  # fmt: skip
    ],
    ids=["linear_probe", "coop_csc"],
)
def test_adapters_learn_the_kshot_photos(cls, kw, epochs, tiny_clip_path, kshot_data, tmp_path):
    module = _module(cls, tiny_clip_path, kshot_data, **kw)
    loss0, acc0 = _loss_acc(module, kshot_data)
    trainer = fit(module, kshot_data, tmp_path, epochs)
    loss1, acc1 = _loss_acc(module, kshot_data)
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    assert acc1 >= 0.5 > acc0 + 0.2, (acc0, acc1)  # 10 classes: chance is 0.1
    # The callback kept the best epoch by val accuracy and wrote the adapter beside the checkpoint.
    ckpt = trainer.checkpoint_callback
    assert ckpt.monitor == "val/acc" and ckpt.best_model_path.endswith("best.ckpt")
    meta = adapter_metadata(tmp_path / "adapter.safetensors")
    assert meta["kind"] == module.adapter.kind and meta["class_names"] == kshot_data.class_names
    assert meta["metrics"]["val_acc"] == pytest.approx(float(ckpt.best_model_score))
    assert "class_path" in meta["config"] and type(module).__name__ in meta["config"]
    # What evaluation names runs by comes from the file itself: method, k, seed, CLIP and its weights.
    info = adapter_info(tmp_path / "adapter.safetensors")
    assert (info["method"], info["shots"], info["seed"], info["dataset"]) == (
        module.method,
        4,
        1,
        "fashion_mnist",
    )
    assert info["model_name"] == TINY_CLIP and info["weights_id"] == module.bundle.weights_id
    assert info["class_names_sha256"] == class_names_sha256(kshot_data.class_names)


def test_shared_context_prompt_tuning_lowers_the_loss(tiny_clip_path, kshot_data, tmp_path):
    module = _module(PromptTuningModule, tiny_clip_path, kshot_data, lr=0.01, optimizer="adamw",
                     weight_decay=0.0, recipe="linear_warmup")  # fmt: skip
    loss0, _ = _loss_acc(module, kshot_data)
    fit(module, kshot_data, tmp_path, 10)
    loss1, _ = _loss_acc(module, kshot_data)
    assert loss1 < 0.6 * loss0, (loss0, loss1)


# ------------------------------------------------------------------------------ save / load
def _perturbed(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.adapter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


@pytest.mark.parametrize("cls, kw", [(LinearProbeModule, {"blend": 0.3}), (PromptTuningModule, {})])
def test_saved_adapter_reloads_with_identical_logits(
    cls, kw, tiny_clip_path, tiny_clip_bundle, kshot_data, tmp_path
):
    from cascadevlm.clip.module import ClipClassifier

    module = _perturbed(_module(cls, tiny_clip_path, kshot_data, **kw)).eval()
    path = module.save_adapter(tmp_path / "a.safetensors", config="model: {}\n", metrics={"val_acc": 0.5})
    feats = kshot_data.features["val"]
    with torch.no_grad():
        expected = module(feats)
        loaded = load_adapter(path, bundle=tiny_clip_bundle, class_names=kshot_data.class_names)
        assert torch.equal(loaded(feats), expected)
        # The evaluation module uses the same loader: its logits are the adapter's, not zero-shot's.
        clf = ClipClassifier(
            TINY_CLIP, str(tiny_clip_path), class_names=kshot_data.class_names, adapter=str(path)
        )
        clf.ensure_head()
        assert torch.equal(clf.logits(feats), expected)
    meta = adapter_metadata(path)
    assert meta["model_name"] == TINY_CLIP and meta["weights_id"] == tiny_clip_bundle.weights_id
    assert (
        meta["embed_dim"] == "64" and meta["config"] == "model: {}\n" and meta["metrics"] == {"val_acc": 0.5}
    )


def test_adapter_info_reads_method_k_seed_and_falls_back_to_old_files_metrics(tiny_clip_bundle, tmp_path):
    b = tiny_clip_bundle
    head = torch.nn.functional.normalize(torch.randn(3, b.embed_dim), dim=-1)
    common = dict(model_name=b.model_name, weights_id=b.weights_id, class_names=["a", "b", "c"],
                  logit_scale=100.0, embed_dim=b.embed_dim)  # fmt: skip
    path = save_adapter(tmp_path / "new.safetensors", LinearProbe(head, 100.0), shots=16, seed=3, dataset="cub200",
                        **common)  # fmt: skip
    info = adapter_info(path)
    assert (info["method"], info["shots"], info["seed"], info["dataset"]) == ("linear_probe", 16, 3, "cub200")
    assert info["weights_id"] == b.weights_id and info["class_names_sha256"] == class_names_sha256(
        ["a", "b", "c"]
    )
    # A file written before these keys existed: the training metrics stored in it name k and seed.
    old = save_adapter(tmp_path / "old.safetensors", LinearProbe(head, 100.0),
                       metrics={"method": "linear_probe", "shots": 8, "seed": 2}, **common)  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(old), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k not in ("method", "shots", "seed", "dataset")}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    save_file(tensors, str(old), metadata=meta)
    assert (adapter_info(old)["shots"], adapter_info(old)["seed"]) == (8, 2)


@pytest.fixture(scope="module")
def probe_file(tiny_clip_path, kshot_data, tmp_path_factory):
    module = _module(LinearProbeModule, tiny_clip_path, kshot_data)
    return module.save_adapter(tmp_path_factory.mktemp("probe") / "probe.safetensors")


def test_adapter_for_another_model_is_refused(probe_file, kshot_data, tmp_path):
    other = load_clip("cascadevlm-small-vit", str(build_tiny_clip(tmp_path, "cascadevlm-small-vit")))
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(probe_file, bundle=other, class_names=kshot_data.class_names)
    msg = str(err.value)
    assert "model_name: adapter 'cascadevlm-tiny-vit', loaded CLIP 'cascadevlm-small-vit'" in msg
    assert "embed_dim: adapter 64, loaded CLIP 128" in msg


def test_adapter_for_other_weights_is_refused(probe_file, kshot_data, tmp_path):
    other = load_clip(TINY_CLIP, str(build_tiny_clip(tmp_path, TINY_CLIP, seed=1)))
    with pytest.raises(AdapterMismatchError, match=r"weights_id: adapter 'sha256:[0-9a-f]{64}', loaded CLIP"):
        load_adapter(probe_file, bundle=other, class_names=kshot_data.class_names)


def test_adapter_for_another_class_list_is_refused(probe_file, tiny_clip_bundle, kshot_data):
    names = kshot_data.class_names
    with pytest.raises(
        AdapterMismatchError, match="only in the adapter: \\['ankle boot'\\]; only in the given list"
    ):
        load_adapter(probe_file, bundle=tiny_clip_bundle, class_names=[*names[:-1], "sock"])
    with pytest.raises(AdapterMismatchError, match="the same classes in a different order"):
        load_adapter(probe_file, bundle=tiny_clip_bundle, class_names=names[::-1])


def test_adapter_of_another_dimension_is_refused(tiny_clip_bundle, kshot_data, tmp_path):
    b = tiny_clip_bundle
    probe = LinearProbe(F.normalize(torch.randn(10, 32), dim=-1), 100.0)
    path = save_adapter(
        tmp_path / "d32.safetensors",
        probe,
        model_name=b.model_name,
        weights_id=b.weights_id,
        class_names=kshot_data.class_names,
        logit_scale=100.0,
        embed_dim=32,
    )
    with pytest.raises(AdapterMismatchError, match="embed_dim: adapter 32, loaded CLIP 64"):
        load_adapter(path, bundle=b, class_names=kshot_data.class_names)


def test_files_that_are_not_adapters_are_refused(tiny_clip_bundle, tiny_clip_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter file .* does not exist"):
        load_adapter(tmp_path / "missing.safetensors", bundle=tiny_clip_bundle, class_names=["a"])
    with pytest.raises(ValueError, match="is not a cascadevlm CLIP adapter"):
        load_adapter(tiny_clip_path, bundle=tiny_clip_bundle, class_names=["a"])
    plain = tmp_path / "plain.safetensors"
    save_file(
        {"x": torch.zeros(1)}, str(plain), metadata={"format": "cascadevlm.clip_adapter", "kind": "lora"}
    )
    with pytest.raises(ValueError, match="unknown kind 'lora'"):
        load_adapter(plain, bundle=tiny_clip_bundle, class_names=["a"])


def test_a_missing_checkpoint_is_refused_in_one_line_and_never_written(tmp_path):
    missing = tmp_path / "tiny" / "cascadevlm-tiny-vit-seed0.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        LinearProbeModule(model_name=TINY_CLIP, pretrained=str(missing))
    assert str(err.value) == (
        f"CLIP checkpoint {str(missing)!r} does not exist; set pretrained (--model.pretrained) to a checkpoint "
        "file or an open_clip tag"
    )
    assert not missing.exists()  # the product loads paths; demo models are built by cascadevlm.zoo


# ------------------------------------------------------------------------------ k x seeds report
def test_kshot_report_gives_mean_and_std_over_seeds(tmp_path):
    accs = {(1, 1): 0.50, (1, 2): 0.60, (1, 3): 0.70, (4, 1): 0.80, (4, 2): 0.90}
    for (k, seed), acc in accs.items():
        run = tmp_path / "fashion_mnist_coop" / f"k{k}_seed{seed}"
        run.mkdir(parents=True)
        payload = {
            "dataset": "fashion_mnist",
            "method": "coop",
            "shots": k,
            "seed": seed,
            "val_acc": acc - 0.1,
        }
        payload.update(test_acc=acc, zero_shot_test_acc=0.25)
        (run / "metrics.json").write_text(json.dumps(payload))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"acc1": 0.3}))  # not a training run
    table = aggregate(collect_runs(tmp_path))
    assert [(r["k"], r["n_seeds"]) for r in table] == [(1, 3), (4, 2)]
    assert table[0]["test_acc_mean"] == pytest.approx(0.6) and table[0]["test_acc_std"] == pytest.approx(0.1)
    assert table[1]["test_acc_std"] == pytest.approx(0.0707107, rel=1e-5)
    md = kshot_main(["--runs", str(tmp_path)])
    assert "| fashion_mnist | coop | 25.0 | 60.0 ± 10.0 | 85.0 ± 7.1 |" in md
    assert (tmp_path / "kshot.md").read_text() == md
    assert (tmp_path / "kshot.csv").read_text().splitlines()[1].startswith("fashion_mnist,coop,1,3,1 2 3,")


def test_old_adapter_module_path_names_the_package_classes_so_saved_run_configs_still_load():
    """Configs saved before the package split name ``cascadevlm.clip.adapter_module.<Class>``."""
    import cascadevlm.clip.adapter_module as old
    import cascadevlm.clip.adapters as new

    for name in ("LinearProbeModule", "PromptTuningModule", "KShotFeatureDataModule", "AdapterCheckpoint"):
        assert getattr(old, name) is getattr(new, name)


def test_kshot_report_keeps_runs_of_other_clip_weights_in_their_own_rows(tmp_path):
    """Runs of two CLIP weights under one root (each in its own directory) were averaged into one cell."""
    for weights, seed, acc in (("a.safetensors", 1, 0.5), ("a.safetensors", 2, 0.7), ("openai", 3, 0.9)):
        run = tmp_path / f"fashion_mnist_ViT-B-32_{weights.split('.')[0]}_coop" / f"k1_seed{seed}"
        run.mkdir(parents=True)
        payload = {"dataset": "fashion_mnist", "method": "coop", "shots": 1, "seed": seed, "test_acc": acc,
                   "model_name": "ViT-B-32", "weights_id": f"id-{weights}", "pretrained": f"/w/{weights}"}  # fmt: skip
        if weights == "openai":
            payload["pretrained"] = "openai"
        (run / "metrics.json").write_text(json.dumps(payload))
    table = aggregate(collect_runs(tmp_path))
    cells = [(r["method"], r["seeds"], round(r["test_acc_mean"], 6)) for r in table]
    assert cells == [("coop (ViT-B-32 a)", [1, 2], 0.6), ("coop (ViT-B-32 openai)", [3], 0.9)]
