"""Resuming the LVLM stage: fingerprint (answers vs connection settings), torn tails, failed API calls,
atomic outputs, and LVLM calls counted across ranks and attempts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_cascade import fake_args

from cascadevlm.cascade.lvlm_stage import read_answers
from cascadevlm.cli import run_evaluate as main
from cascadevlm.lvlm.api_backend import API_ERROR, OpenAIBackend
from cascadevlm.lvlm.base import RETRY_FALLBACKS, needs_retry
from cascadevlm.records import atomic_path, atomic_write_text, read_records, repair_torn_tail
from cascadevlm.testing.fake_lvlm import FakeLVLM

REPO = Path(__file__).resolve().parents[1]
ALL = ("--cascade.tau=-inf", "--cascade.lvlm_batch_size", "4")


pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


def _keys() -> list[str]:
    return [r.key for r in FakeLVLM.log]


def _crash_after(monkeypatch, batches: int) -> None:
    real = FakeLVLM.choose
    seen = {"n": 0}

    def choose(self, requests):
        seen["n"] += 1
        if seen["n"] > batches:
            raise RuntimeError("simulated crash")
        return real(self, requests)

    monkeypatch.setattr(FakeLVLM, "choose", choose)


# ------------------------------------------------------------------------------------- fingerprint
def test_answer_fingerprint_leaves_out_connection_settings(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    a = OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1", api_key_env="FAKE_KEY", cache_path=None,
                      max_concurrency=2, timeout_s=5, max_retries=1)  # fmt: skip
    b = OpenAIBackend("m", base_url="http://127.0.0.1:9000/v1", api_key_env="FAKE_KEY", cache_path=None,
                      max_concurrency=8, timeout_s=50, max_retries=3)  # fmt: skip
    c = OpenAIBackend("m", base_url="http://127.0.0.1:9000/v1", api_key_env="FAKE_KEY", cache_path=None,
                      temperature=0.7)  # fmt: skip
    assert a.answer_fingerprint() == b.answer_fingerprint()
    assert a.answer_fingerprint() != c.answer_fingerprint()
    assert not set(a.answer_fingerprint()) & set(OpenAIBackend.CONNECTION_FIELDS)
    assert (
        FakeLVLM(base_url="x").answer_fingerprint()
        == FakeLVLM(base_url="y", timeout_s=1).answer_fingerprint()
    )


def test_changing_the_port_resumes_changing_templates_refuses(
    tiny_clip_path, data_root, tmp_path, monkeypatch
):
    base = fake_args(tiny_clip_path, data_root, tmp_path, "r", *ALL, limit=20)
    _crash_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*base, "--lvlm.init_args.base_url", "http://127.0.0.1:8000/v1"])
    monkeypatch.undo()
    assert len(read_answers(tmp_path / "r" / "parts")) == 8
    FakeLVLM.log.clear()
    out = main(
        [*base, "--lvlm.init_args.base_url", "http://127.0.0.1:9001/v1", "--lvlm.init_args.timeout_s", "5"]
    )
    assert len(FakeLVLM.log) == 12  # only the images without an answer
    assert out["params"]["images"] == 20
    with pytest.raises(ValueError) as err:
        main([*base, "--data.templates", '["a blurry photo of a {}."]'])
    assert str(err.value) == (
        f"{tmp_path / 'r' / 'parts'} holds LVLM answers from another LVLM configuration (differs in: "
        "clip.templates); use another --run_name or delete that directory to start over"
    )


# --------------------------------------------------------------------------------------- torn tail
def test_torn_last_answer_line_is_repaired_before_appending(tiny_clip_path, data_root, tmp_path):
    # the answer store off: the part file alone resumes (with it, the 5 lost answers come from the store)
    args = fake_args(tiny_clip_path, data_root, tmp_path, "r", *ALL, "--answer_store", "null", limit=20)
    main(args)
    part = tmp_path / "r" / "parts" / "lvlm.rank0.jsonl"
    lines = part.read_text().splitlines()
    assert len(lines) == 20
    # a run killed while writing: the last 5 answers lost, a fragment of the 16th left without newline
    part.write_text("\n".join(lines[:15]) + "\n" + lines[15][:17])
    FakeLVLM.log.clear()
    main(args)
    assert len(FakeLVLM.log) == 5
    final = part.read_text()
    assert final.endswith("\n")
    rows = [json.loads(x) for x in final.splitlines()]  # every line parses
    assert sorted(r["index"] for r in rows) == list(range(20))
    assert len(read_records(tmp_path / "r" / "records.parquet")) == 20


def test_repair_torn_tail_unit(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert repair_torn_tail(p) == 4 and p.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    assert repair_torn_tail(p) == 0
    p.write_bytes(b'{"a"')  # only a fragment
    assert repair_torn_tail(p) == 4 and p.read_bytes() == b""
    assert repair_torn_tail(tmp_path / "missing.jsonl") == 0


# ------------------------------------------------------------------------------- failed API calls
def test_rerun_asks_again_every_api_error_answer(tiny_clip_path, data_root, tmp_path):
    assert API_ERROR in RETRY_FALLBACKS and needs_retry(API_ERROR) and not needs_retry("unparseable")
    args = fake_args(tiny_clip_path, data_root, tmp_path, "r", *ALL, limit=20)
    FakeLVLM.fail_keys = {"test/3", "test/11"}
    first = main(args)
    recs = read_records(tmp_path / "r" / "records.parquet")
    assert [r.index for r in recs if r.fallback == API_ERROR] == [3, 11]
    assert first["params"]["lvlm_api_errors"] == 2

    FakeLVLM.log.clear()
    FakeLVLM.fail_keys = set()
    again = main(args)
    assert sorted(_keys()) == ["test/11", "test/3"]  # exactly the failed calls, nothing else
    recs = read_records(tmp_path / "r" / "records.parquet")
    assert not any(r.fallback for r in recs)
    assert again["params"]["lvlm_api_errors"] == 0
    assert again["params"]["lvlm_calls"] == 22 and again["params"]["lvlm_calls_this_attempt"] == 2

    FakeLVLM.log.clear()
    main(args)  # nothing left to ask
    assert FakeLVLM.log == []


# ---------------------------------------------------------------------------------- atomic outputs
def test_crash_before_the_first_answer_does_not_block_the_corrected_command(
    tiny_clip_path, data_root, tmp_path, monkeypatch
):
    base = fake_args(tiny_clip_path, data_root, tmp_path, "r", *ALL, limit=12)
    _crash_after(monkeypatch, 0)  # dies on the first LVLM batch: only config files were written
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*base, "--cascade.topk", "3"])
    monkeypatch.undo()
    assert read_answers(tmp_path / "r" / "parts") == {}
    out = main(base)  # the corrected command (another topk) runs in the same directory
    assert out["params"]["topk"] == 5 and {len(r.candidates) for r in FakeLVLM.log} == {5}
    leftovers = [p for p in (tmp_path / "r").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_outputs_are_written_atomically(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of a new fil")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_crash_while_reporting_keeps_the_previous_outputs(tiny_clip_path, data_root, tmp_path, monkeypatch):
    args = fake_args(tiny_clip_path, data_root, tmp_path, "r", "--lvlm", "null", limit=12)
    main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert {"metrics.json", "records.parquet", "summary.md", "gate.json", "clip_records.parquet"} <= set(
        before
    )

    import cascadevlm.report.summary as summary

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(summary, "summary_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(args)
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert after["metrics.json"] == before["metrics.json"]  # never half a file, never a mix
    assert not [n for n in after if n.endswith(".tmp")]


# ------------------------------------------------------------------------------------ call counts
def test_lvlm_calls_count_every_attempt(tiny_clip_path, data_root, tmp_path, monkeypatch):
    args = fake_args(tiny_clip_path, data_root, tmp_path, "r", *ALL, limit=20)
    _crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    monkeypatch.undo()
    assert len(FakeLVLM.log) == 12
    out = main(args)
    assert out["params"]["lvlm_calls_this_attempt"] == 8
    assert out["params"]["lvlm_calls"] == 20 == len(FakeLVLM.log)


@pytest.mark.slow
def test_lvlm_calls_count_every_ddp_rank(tiny_clip_path, data_root, tmp_path):
    args = fake_args(tiny_clip_path, data_root, tmp_path, "two", "--cascade.tau=-inf", "--cascade.lvlm_batch_size",
                     "4", "--trainer.devices", "2", "--trainer.strategy", "ddp", limit=37)  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "cascadevlm.cli", "evaluate", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=400, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    parts = tmp_path / "two" / "parts"
    asked = [
        json.loads(x)["index"] for f in parts.glob("lvlm.rank*.jsonl") for x in f.read_text().splitlines()
    ]
    assert len(list(parts.glob("lvlm.rank*.jsonl"))) == 2
    assert sorted(set(asked)) == list(range(37))
    # every request of both ranks (19 + 18), not rank 0's share alone
    assert metrics["params"]["lvlm_calls"] == len(asked) == 37
    assert metrics["params"]["devices"] == 2
