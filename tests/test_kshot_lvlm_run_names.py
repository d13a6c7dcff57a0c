"""tools/kshot_lvlm.py: every option that changes an evaluation's result is in its run name, so a rerun
with another --cap or --lora_epochs never reuses (skips to) a run of the other setting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("kshot_lvlm_tool", ROOT / "tools" / "kshot_lvlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _names(monkeypatch, tmp_path, extra: list[str]) -> list[str]:
    mod = _tool()
    names: list[str] = []

    def evaluate(out, name, limit, args):
        names.append(name)
        return tmp_path / name

    numbers = {"indices": [1], "lvlm_acc": 0.5, "cascade_acc": 0.5, "clip_acc_deferred": 0.4, "clip_acc": 0.6,
               "deferred": 1, "images": 2, "lvlm_calls": 1}  # fmt: skip
    monkeypatch.setattr(mod, "evaluate", evaluate)
    monkeypatch.setattr(mod, "deferred_numbers", lambda run: dict(numbers))
    monkeypatch.setattr(mod, "train_lora", lambda out, k, s, records, epochs: tmp_path / "adapter")
    mod.main(["--out", str(tmp_path), "--seeds", "1", "--incontext", "4", "--lora", "4", "--held_out", "0", "0",
              *extra])  # fmt: skip
    return names


def test_cap_and_lora_epochs_are_in_the_run_names(monkeypatch, tmp_path):
    base = _names(monkeypatch, tmp_path, ["--cap", "6", "--lora_epochs", "4"])
    other = _names(monkeypatch, tmp_path, ["--cap", "3", "--lora_epochs", "8"])
    changed = {a for a, b in zip(base, other, strict=True) if a != b}
    incontext = [n for n in base if n.startswith("incontext")]
    lora = [n for n in base if n.startswith("lora")]
    assert incontext and lora
    assert set(incontext) <= changed  # --cap 6 vs 3: 6 vs 3 examples per prompt at k=4
    assert set(lora) <= changed  # another adapter recipe
    assert "zero_shot" in base and "zero_shot" not in changed  # the rest is shared, as before


def test_absurd_values_are_refused_in_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    import pytest

    mod = _tool()
    monkeypatch.setattr(mod, "evaluate", lambda *a: pytest.fail("work started"))
    for extra, message in (
        (["--limit", "-5"], "--limit must be at least 1, got -5"),
        (["--cap", "0"], "--cap must be at least 1, got 0"),
        (["--cap", "100"], "--cap 100: at most 6 in-context examples fit the model's 512-token window"),
        (["--lora_epochs", "0"], "--lora_epochs must be at least 1, got 0"),
        (["--incontext", "1", "0"], "--incontext must be at least 1, got 0"),
        (["--lora", "-1"], "--lora must be at least 1, got -1"),
        (["--held_out", "5000", "1000"], "--held_out START STOP must have 0 <= START < STOP (0 0: skip)"),
    ):
        with pytest.raises(SystemExit):
            mod.main(["--out", str(tmp_path), *extra])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err, err
