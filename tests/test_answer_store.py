"""The LVLM answer store (lvlm/cache.py) as the LVLM stage uses it: no answer is paid for twice, no
stored answer serves another model, a damaged entry is asked again, a kill -9 mid-write loses nothing
committed; and evaluate.py's rerun with another gate asks the LVLM nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from fake_cascade import fake_args
from PIL import Image

from cascadevlm.cascade.lvlm_stage import LVLMStage
from cascadevlm.lvlm.cache import AnswerStore, StoredAnswer, answer_key, cache_key, model_identity
from cascadevlm.testing.fake_lvlm import FakeLVLM

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")
NAMES = [f"class{i}" for i in range(10)]


def _batch(start: int, n: int = 4) -> list[dict]:
    """Deferred images as the stage's dataset gives them: distinct small images, candidates, keys."""
    return [
        {"index": i, "image": Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, 3)),
         "candidate_ids": [(i + j) % 10 for j in range(3)], "key": f"test/{i}"}
        for i in range(start, start + n)
    ]  # fmt: skip


def _answers(stage: LVLMStage, batches: list[list[dict]]) -> list:
    return [r for b in batches for r in stage.predict_step(b)]


def test_a_second_stage_with_the_store_asks_nothing_and_answers_the_same(tmp_path):
    batches = [_batch(0), _batch(4)]
    reference = _answers(LVLMStage(FakeLVLM(), NAMES), batches)  # no store
    store = AnswerStore(tmp_path / "answers.sqlite")
    first = LVLMStage(FakeLVLM(), NAMES, store=store)
    assert _answers(first, batches) == reference and first.backend.calls == 8
    again = LVLMStage(
        FakeLVLM(), NAMES, store=AnswerStore(tmp_path / "answers.sqlite")
    )  # a new process' view
    assert _answers(again, batches) == reference
    assert again.backend.calls == 0


def test_other_weights_or_settings_get_no_hits(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights one")
    store = AnswerStore(tmp_path / "answers.sqlite")
    batches = [_batch(0)]
    _answers(LVLMStage(FakeLVLM(model=str(weights)), NAMES, store=store), batches)
    same = LVLMStage(FakeLVLM(model=str(weights)), NAMES, store=store)
    _answers(same, batches)
    assert same.backend.calls == 0
    weights.write_bytes(b"weights two")  # the same path, other weights
    other = LVLMStage(FakeLVLM(model=str(weights)), NAMES, store=store)
    _answers(other, batches)
    assert other.backend.calls == 4
    salted = LVLMStage(FakeLVLM(model=str(weights), salt=1), NAMES, store=store)  # another answer setting
    _answers(salted, batches)
    assert salted.backend.calls == 4
    # another candidate order is another question
    swapped = [{**b, "candidate_ids": b["candidate_ids"][::-1]} for b in _batch(0)]
    again = LVLMStage(FakeLVLM(model=str(weights)), NAMES, store=store)
    _answers(again, [swapped])
    assert again.backend.calls == 4


def test_a_damaged_entry_is_asked_again(tmp_path):
    path = tmp_path / "answers.sqlite"
    batches = [_batch(0)]
    reference = _answers(LVLMStage(FakeLVLM(), NAMES, store=AnswerStore(path)), batches)
    with sqlite3.connect(path) as db:
        keys = [k for (k,) in db.execute("SELECT key FROM answers WHERE model != 'file-digest' ORDER BY key")]
        db.execute("UPDATE answers SET raw = ? WHERE key = ?", ('{"choice": 2, "raw": "x"', keys[0]))  # torn
        raw = json.loads(db.execute("SELECT raw FROM answers WHERE key = ?", (keys[1],)).fetchone()[0])
        raw["choice"] = (raw["choice"] + 1) % 3  # well-formed, but not what was stored: checksum differs
        db.execute("UPDATE answers SET raw = ? WHERE key = ?", (json.dumps(raw), keys[1]))
    store = AnswerStore(path)
    stage = LVLMStage(FakeLVLM(), NAMES, store=store)
    assert _answers(stage, batches) == reference
    assert stage.backend.calls == 2 and store.corrupt == 2
    fresh = LVLMStage(FakeLVLM(), NAMES, store=AnswerStore(path))  # stored afresh
    _answers(fresh, batches)
    assert fresh.backend.calls == 0


WRITER = textwrap.dedent(
    """
    import sys, time
    from PIL import Image
    from cascadevlm.lvlm.base import LVLMRequest
    from cascadevlm.lvlm.cache import AnswerStore, StoredAnswer, answer_key, cache_key, model_identity
    from cascadevlm.testing.fake_lvlm import FakeLVLM

    store, backend = AnswerStore(sys.argv[1]), FakeLVLM()
    model_key = cache_key(model_identity(backend, store))
    names = [f"class{i}" for i in range(10)]

    class HangMidWrite:  # the second batch's rows are written, then the process waits to be killed
        def __init__(self, conn):
            self.conn = conn
        def __getattr__(self, name):
            return getattr(self.conn, name)
        def __enter__(self):
            return self.conn.__enter__()
        def __exit__(self, *exc):
            return self.conn.__exit__(*exc)
        def executemany(self, *args):
            out = self.conn.executemany(*args)
            print("mid-write", flush=True)
            time.sleep(600)
            return out

    for start in (0, 4):  # what the stage does per batch: ask, then store the batch in one transaction
        reqs = [LVLMRequest(Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, 3)),
                            [names[(i + j) % 10] for j in range(3)], key=f"test/{i}") for i in range(start, start + 4)]
        answers = backend.choose(reqs)
        if start == 4:
            store._conn = HangMidWrite(store._db)
        store.put_answers(model_key, {answer_key(model_key, r): StoredAnswer(a.choice, a.raw, a.scores, a.fallback)
                                      for r, a in zip(reqs, answers)})
    """
)


def test_killed_mid_write_the_store_keeps_what_was_committed_and_the_rerun_is_identical(tmp_path):
    path = tmp_path / "answers.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mid-write"  # waits for the signal, not for a time
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    batches = [_batch(0), _batch(4), _batch(8)]
    reference = _answers(LVLMStage(FakeLVLM(), NAMES), batches)
    store = AnswerStore(path)
    stage = LVLMStage(FakeLVLM(), NAMES, store=store)
    assert _answers(stage, batches) == reference
    assert stage.backend.calls == 8  # the first batch was committed; the one in flight and the third were not
    assert store.corrupt == 0


def test_store_keys_follow_the_request(tmp_path):
    store = AnswerStore(tmp_path / "a.sqlite")
    mk = cache_key(model_identity(FakeLVLM(), store))
    (b,) = _batch(0, 1)
    stage = LVLMStage(FakeLVLM(), NAMES)
    (req,) = stage.requests([b])
    keys = {answer_key(mk, req)}
    for change in ({"key": "val/0"}, {"candidate_ids": [1, 0, 2]}, {"image": Image.new("RGB", (8, 8))}):
        (other,) = stage.requests([{**b, **change}])
        keys.add(answer_key(mk, other))
    assert len(keys) == 4
    store.put_answers(mk, {"k": StoredAnswer(0, "x", [0.5, float("-inf")])})
    assert store.get_answer("k", 2) == StoredAnswer(0, "x", [0.5, float("-inf")])
    assert store.get_answer("k", 3) is None and store.corrupt == 1  # scores for another candidate count


def test_evaluate_rerun_with_another_tau_asks_the_lvlm_nothing(tiny_clip_path, data_root, tmp_path):
    from cascadevlm.cli import run_evaluate
    from cascadevlm.records import read_records

    def run(*extra):
        return run_evaluate(fake_args(tiny_clip_path, data_root, tmp_path, None, *extra))

    first = run("--cascade.tau", "0.5")
    second = run("--cascade.tau", "1.0")  # another run directory, the same answers
    assert first["params"]["lvlm_calls"] == 40 and second["params"]["lvlm_calls"] == 0
    assert (tmp_path / "cache" / "answers.sqlite").is_file()
    off = run("--cascade.tau", "2.0", "--answer_store", "null")  # the store turned off: everything asked
    assert off["params"]["lvlm_calls"] == 40
    dirs = sorted(d for d in tmp_path.iterdir() if (d / "records.parquet").exists())
    choices = [[r.lvlm_choice for r in read_records(d / "records.parquet")] for d in dirs]
    assert len(dirs) == 3 and choices[0] == choices[1] == choices[2]


CONCURRENT_WRITER = textwrap.dedent(
    """
    import sys
    from cascadevlm.lvlm.cache import AnswerStore, StoredAnswer
    store = AnswerStore(sys.argv[1])
    for i in range(150):  # one transaction per batch, as the stage writes
        store.put_answers("m", {f"{sys.argv[2]}-{i}": StoredAnswer(i % 3, f"raw {i}")})
    """
)


def test_two_processes_write_one_store_at_once(tmp_path):
    path = tmp_path / "answers.sqlite"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(path), name]) for name in ("a", "b")
    ]
    assert [p.wait() for p in procs] == [0, 0]  # no "database is locked": a writer waits for the other
    store = AnswerStore(path)
    assert len(store) == 300
    assert all(
        store.get_answer(f"{n}-{i}", 3) == StoredAnswer(i % 3, f"raw {i}") for n in "ab" for i in range(150)
    )


def test_a_store_locked_while_another_process_opens_it_is_waited_for(tmp_path, monkeypatch):
    # DDP ranks open one new store at once; switching it to WAL answers "database is locked" without
    # SQLite's busy wait (a 2-process DDP run died on it under load): the open is tried again
    import cascadevlm.lvlm.cache as cache

    real_connect, refusals = sqlite3.connect, []

    class LockedOnce:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and len(refusals) < 2:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def __enter__(self):
            return self._conn.__enter__()

        def __exit__(self, *exc):
            return self._conn.__exit__(*exc)

    monkeypatch.setattr(cache.sqlite3, "connect", lambda *a, **k: LockedOnce(real_connect(*a, **k)))
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.put("k", "m", "v")
    assert len(refusals) == 2 and store.get("k") == "v"
    # a file that is no database is still refused in one line, at once
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match=r"answer store .*junk.sqlite cannot be opened \(file is not a database\)"):
        AnswerStore(tmp_path / "junk.sqlite").get("k")


def test_a_prompt_worded_for_another_dataset_gets_no_hits(tmp_path):
    # evaluate.py sets a default prompt's noun ("aircraft variant") after the backend is built; the
    # backend's init arguments do not show it, so the store's model identity reads the live prompt
    from cascadevlm.lvlm.prompts import PromptConfig

    store = AnswerStore(tmp_path / "answers.sqlite")
    first = FakeLVLM(model="m")
    first.prompt = PromptConfig()
    _answers(LVLMStage(first, NAMES, store=store), [_batch(0)])
    reworded = FakeLVLM(model="m")
    reworded.prompt = PromptConfig()
    reworded.prompt.noun = "aircraft variant"
    _answers(LVLMStage(reworded, NAMES, store=store), [_batch(0)])
    assert reworded.calls == 4
    same = FakeLVLM(model="m")
    same.prompt = PromptConfig()
    _answers(LVLMStage(same, NAMES, store=store), [_batch(0)])
    assert same.calls == 0


@pytest.mark.parametrize("old_file", [False, True], ids=["new-file", "file-before-checksums"])
def test_two_workers_opening_one_store_at_once_both_open_it(tmp_path, monkeypatch, old_file):
    # CI failure: two DataLoader workers opened a new store together; both saw no checksum column and
    # both added it, and the second died on "duplicate column name: checksum". Replayed here in one
    # process: the other worker opens the file between this one's look at the columns and its ALTER.
    import cascadevlm.lvlm.cache as cache

    path = tmp_path / "answers.sqlite"
    if old_file:  # written before checksums: one answer, no checksum column
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, raw TEXT NOT NULL, "
                       "created REAL NOT NULL)")  # fmt: skip
            db.execute("INSERT INTO answers VALUES ('old', 'm', 'kept', 0)")
    real_columns, other = cache._columns, []

    def columns_then_the_other_worker_opens(conn):
        seen = real_columns(conn) - {"checksum"}  # what this worker saw before the other one's change
        if not other:
            monkeypatch.setattr(cache, "_columns", real_columns)
            other.append(AnswerStore(path))
            other[0].put("theirs", "m", "v1")
        return seen

    monkeypatch.setattr(cache, "_columns", columns_then_the_other_worker_opens)
    store = AnswerStore(path)
    store.put("mine", "m", "v2")
    assert other and store.get("theirs") == "v1" and other[0].get("mine") == "v2"
    assert store.get("old") == ("kept" if old_file else None)


def test_dropping_a_damaged_entry_keeps_the_answer_another_process_stored_meanwhile(tmp_path, monkeypatch):
    # A damaged entry is dropped so it is asked again; another process (a DDP rank, a second run) may
    # have asked and stored it between this one's read and its delete. Replayed in one process: the
    # other store writes the fresh answer right after this one has read the damaged row.
    import cascadevlm.lvlm.cache as cache

    path = tmp_path / "answers.sqlite"
    mine, theirs = AnswerStore(path), AnswerStore(path)
    mine.put("k", "m", "damaged")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE answers SET checksum = 'bad' WHERE key = 'k'")
    db.close()
    real_checksum = cache._checksum

    def checksum_then_the_other_stores(key, value):
        if value == "damaged":  # this store's look at the damaged row
            monkeypatch.setattr(cache, "_checksum", real_checksum)
            theirs.put("k", "m", "asked again")
        return real_checksum(key, value)

    monkeypatch.setattr(cache, "_checksum", checksum_then_the_other_stores)
    assert mine.get("k") is None and mine.corrupt == 1  # what it read was damaged
    assert mine.get("k") == theirs.get("k") == "asked again"  # and the other's answer was not deleted


def test_dropping_an_unusable_answer_keeps_the_answer_another_process_stored_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "answers.sqlite"
    mine, theirs = AnswerStore(path), AnswerStore(path)
    mine.put_answers("m", {"k": StoredAnswer(0, "x", [0.5, 0.5])})  # scores for 2 candidates, asked with 3
    fresh = StoredAnswer(1, "y", [0.1, 0.8, 0.1])
    real_get = mine.get

    def get_then_the_other_stores(key):
        raw = real_get(key)
        theirs.put_answers("m", {key: fresh})
        return raw

    monkeypatch.setattr(mine, "get", get_then_the_other_stores)
    assert mine.get_answer("k", 3) is None and mine.corrupt == 1
    monkeypatch.setattr(mine, "get", real_get)
    assert mine.get_answer("k", 3) == theirs.get_answer("k", 3) == fresh
