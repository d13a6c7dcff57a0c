"""Run names hold everything that changes a result; tables take k/seed/method from the adapter file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cascadevlm.cascade.evaluate import CascadeOptions, Threshold, default_run_name
from cascadevlm.cli import run_evaluate as main
from cascadevlm.clip.adapters import LinearProbe, save_adapter
from cascadevlm.clip.zero_shot import build_zero_shot_head
from cascadevlm.data.registry import get_benchmark
from cascadevlm.report.tables import collect_results, write_results_tables
from cascadevlm.testing.fake_lvlm import FakeLVLM

CLASSES = list(get_benchmark("fashion_mnist").class_names)


def _adapter(bundle, path, method: str, shots: int, seed: int):
    head = build_zero_shot_head(bundle.model, bundle.tokenizer, CLASSES, ["a photo of a {}."], 64, "cpu")
    scale = float(bundle.model.logit_scale.exp())
    return save_adapter(path, LinearProbe(head, scale), model_name=bundle.model_name, weights_id=bundle.weights_id,
                        class_names=CLASSES, logit_scale=scale, embed_dim=head.shape[1], method=method,
                        shots=shots, seed=seed, dataset="fashion_mnist")  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_clip_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    specs = {"coop16s1": ("coop", 16, 1), "coop16s2": ("coop", 16, 2), "lp16s1": ("linear_probe", 16, 1),
             "coop8s1": ("coop", 8, 1)}  # fmt: skip
    # every file is called adapter.safetensors, as train.py writes them
    return {k: _adapter(tiny_clip_bundle, root / k / "adapter.safetensors", *v) for k, v in specs.items()}


def _name(
    adapter=None, precision="fp32", trainer_precision="32-true", classes=None, backend="default", **opts
):
    dm = SimpleNamespace(
        name="fashion_mnist", split="test", shots=0, seed=1, limit=None, class_names=classes or CLASSES
    )
    hp = SimpleNamespace(model_name="cascadevlm-tiny-vit", pretrained="/w/tiny.safetensors", precision=precision,
                         adapter=adapter)  # fmt: skip
    model = SimpleNamespace(hparams=hp, templates=["a photo of a {}."])
    backend = FakeLVLM() if backend == "default" else backend
    return default_run_name(
        dm, model, backend, CascadeOptions(**opts), classes is not None, trainer_precision
    )


def test_runs_differing_in_anything_that_changes_the_result_get_different_names(adapters):
    variants = {
        "base": _name(),
        "tau": _name(tau=Threshold(0.5)),
        "tau2": _name(tau=Threshold(1.0)),
        "tau-inf": _name(tau=Threshold(float("-inf"))),
        "budget": _name(budget=0.2),
        "budget2": _name(budget=0.3),
        "budget_split": _name(budget=0.2, budget_split="train"),
        "lvlm_on": _name(lvlm_on="deferred"),
        "topk": _name(topk=3),
        "incontext": _name(incontext_shots=1),
        "incontext_cap": _name(incontext_shots=1, max_examples=2),  # other prompts (same name before)
        "precision": _name(precision="bf16"),
        "trainer_precision": _name(trainer_precision="bf16-mixed"),
        "classes": _name(classes=[c.upper() for c in CLASSES]),
        "classes2": _name(classes=[c.lower() for c in CLASSES]),
        "lvlm_model": _name(backend=FakeLVLM(model="other")),
        "lvlm_mode": _name(backend=FakeLVLM(mode="generate")),
        "lvlm_setting": _name(backend=FakeLVLM(salt=1)),
        "no_lvlm": _name(backend=None),
        **{k: _name(adapter=str(p)) for k, p in adapters.items()},
    }
    assert len(set(variants.values())) == len(variants), variants
    assert "coop_k16_s2" in variants["coop16s2"] and "linear_probe_k16_s1" in variants["lp16s1"]
    assert "tau0.5" in variants["tau"] and "budget0.2-val" in variants["budget"]
    assert variants["incontext"].endswith("_ic1")  # the default cap keeps the names runs had
    # connection settings change no answer: the same name
    assert _name(backend=FakeLVLM(base_url="http://a:1")) == _name(backend=FakeLVLM(base_url="http://b:2"))


def test_16_shot_coop_adapter_with_data_shots_left_0_is_listed_as_16_shot(
    tiny_clip_path, data_root, adapters, tmp_path
):
    base = ["--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "20",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    main([*base, "--model.adapter", str(adapters["coop16s2"])])
    main([*base, "--model.adapter", str(adapters["coop16s1"])])
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2  # the second run did not overwrite the first
    m = json.loads((runs[1] / "metrics.json").read_text())["params"]
    assert (m["shots"], m["seed"], m["adapter_method"]) == (16, 2, "coop")
    rows = collect_results(runs)
    assert {(r["setting"], r["method"]) for r in rows} == {
        ("16-shot", "clip (coop)"),
        ("16-shot", "clip_zero_shot"),
    }
    table = write_results_tables(runs, tmp_path / "tables")["markdown"].read_text()
    assert "| fashion_mnist | 16-shot | clip (coop) | 2 |" in table and "0-shot" not in table
