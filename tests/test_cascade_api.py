"""The cascade with a hosted LVLM: evaluate.py against a chat-completions server on loopback."""

from pathlib import Path

import pytest
from test_lvlm_api import KEY_ENV, SECRET, ChatServer

from cascadevlm.cli import run_evaluate as main
from cascadevlm.lvlm.api_backend import APIFatalError
from cascadevlm.records import read_records


@pytest.mark.slow
def test_cascade_through_an_openai_compatible_api(tiny_clip_path, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    cache = tmp_path / "answers.sqlite"

    def args(server, name):
        return [
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "20",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--lvlm.class_path", "cascadevlm.lvlm.api_backend.OpenAIBackend",
            "--lvlm.init_args.model", "gpt-test-vision", "--lvlm.init_args.base_url", server.url,
            "--lvlm.init_args.api_key_env", KEY_ENV, "--lvlm.init_args.cache_path", str(cache),
            "--lvlm.init_args.backoff_s", "0.01", "--lvlm.init_args.max_concurrency", "2",
            "--cascade.tau=-.inf", "--cascade.lvlm_on", "deferred", "--cascade.lvlm_batch_size", "8",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "features"), "--run_name", name,
        ]  # fmt: skip

    # the model always answers "(B)": the second candidate in CLIP's order; the first call is rate-limited
    with ChatServer(script=["429"]) as server:
        out = main(args(server, "first"))
        assert len(server.requests) == 21  # 20 images + the retried 429
        prompt = server.requests[-1]["body"]["messages"][-1]["content"]
        assert any(p.get("type") == "image_url" for p in prompt)
        assert "clothing item" in str(prompt)  # dataset-aware wording filled in by the cascade
    records = read_records(tmp_path / "runs" / "first" / "records.parquet")
    assert all(r.deferred and r.lvlm_choice == r.clip_topk[1] == r.final for r in records)
    assert out["params"]["lvlm_calls"] == 20

    # another run directory, same answers cache: nothing is paid twice
    with ChatServer() as server:
        again = main(args(server, "second"))
        assert server.requests == []
    assert [r.final for r in read_records(tmp_path / "runs" / "second" / "records.parquet")] == [
        r.final for r in records
    ]
    assert again["params"]["lvlm_calls"] == 0

    # the key is in no file the runs wrote (records, metrics.json with the full config, parts, cache, plots)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_bad_key_stops_the_cascade_with_no_fallback_records(tiny_clip_path, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ChatServer(script=["401"] * 30) as server:
        args = [
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "12",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--lvlm.class_path", "cascadevlm.lvlm.api_backend.OpenAIBackend",
            "--lvlm.init_args.model", "gpt-test-vision", "--lvlm.init_args.base_url", server.url,
            "--lvlm.init_args.api_key_env", KEY_ENV, "--lvlm.init_args.cache_path", str(tmp_path / "c.sqlite"),
            "--cascade.tau=-.inf", "--cascade.lvlm_on", "deferred",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "features"), "--run_name", "bad",
        ]  # fmt: skip
        with pytest.raises((APIFatalError, SystemExit)) as err:
            main(args)
        assert len(server.requests) == 1  # stopped at the first request, not one per image
    if isinstance(err.value, SystemExit):  # the CLI's one-line error form
        assert err.value.code not in (0, None)
    else:
        assert str(err.value).startswith(f"HTTP 401 Unauthorized from {server.url} (model 'gpt-test-vision')")
    run = tmp_path / "runs" / "bad"
    assert not (run / "records.parquet").exists() and not (run / "metrics.json").exists()
    assert not list(run.glob("parts/lvlm.rank*.jsonl")) or all(
        p.read_text() == "" for p in run.glob("parts/lvlm.rank*.jsonl")
    )  # no API-error fallback was recorded


@pytest.mark.slow
def test_cascade_scores_through_the_api_land_in_records(tiny_clip_path, data_root, tmp_path, monkeypatch):
    from test_api_scoring import first_token_logprobs

    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    config = Path(__file__).resolve().parents[1] / "configs" / "lvlm" / "api_vllm_qwen25vl_score.yaml"
    top = [("A", -2.5), (" B", -0.25), ("C", -1.5), ("x", -0.1)]  # D, E: absent (-inf)
    with ChatServer(logprobs=first_token_logprobs(top)) as server:
        out = main([
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "10",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            # the docs/scale.md command: the served-model config, pointed at this server
            "--lvlm", str(config), "--lvlm.init_args.base_url", server.url,
            "--lvlm.init_args.cache_path", str(tmp_path / "c.sqlite"), "--cascade.topk", "5",
            "--cascade.tau=-.inf", "--cascade.lvlm_on", "deferred",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "features"), "--run_name", "s",
        ])  # fmt: skip
        assert len(server.requests) == 10 and all(r["body"]["max_tokens"] == 1 for r in server.requests)
        assert server.requests[0]["body"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    records = read_records(tmp_path / "runs" / "s" / "records.parquet")
    inf = float("inf")
    assert all(r.lvlm_scores == [-2.5, -0.25, -1.5, -inf, -inf] for r in records)
    assert all(r.lvlm_choice == r.clip_topk[1] == r.final and r.fallback is None for r in records)
    assert out["params"]["lvlm_calls"] == 10
