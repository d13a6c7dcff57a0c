"""The LVLM stage with its preprocessing (image decoding, prompt rendering, the processor) in DataLoader
workers: the same answers as in the main process (cascadevlm/cascade/lvlm_stage.py)."""

from __future__ import annotations

import datasets
import lightning as L
import pytest
import torch
from lvlm_fixtures import llava_dir, photo_dataset, photos, qwen2vl_dir  # noqa: F401

from cascadevlm.cascade.lvlm_stage import LVLMStage, PreparedRequests, read_answers, run_lvlm_stage
from cascadevlm.lvlm.incontext import ExemplarPool
from cascadevlm.lvlm.prompts import PromptConfig
from cascadevlm.lvlm.transformers_backend import TransformersBackend
from cascadevlm.records import PredictionRecord

N = 6  # images: stage batches of 4 and 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than several on a shared machine (and the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _split(photos):  # noqa: F811
    """Six photos of different sizes as a split, and their records (CLIP's top-4 class ids each)."""
    names = sorted(photos)
    rows = [photos[n].resize((40 + 8 * i, 48)) for i, n in enumerate(names[:N])]
    ds = datasets.Dataset.from_dict({"image": rows, "label": list(range(N))})
    records = [
        PredictionRecord(index=i, label=i, clip_topk=[i, (i + 3) % 11, (i + 5) % 11, (i + 1) % 11],
                         clip_topk_probs=[0.4, 0.3, 0.2, 0.1], entropy=1.0, clip_pred=i)
        for i in range(N)
    ]  # fmt: skip
    return ds, records, names


def _run(tmp_path, backend, names, ds, records, workers, exemplars=None, topk=3, batch_size=4):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    parts = tmp_path / f"w{workers}"
    stage = LVLMStage(backend, names, exemplars)
    run_lvlm_stage(trainer, stage, ds, records, topk, "test", parts, batch_size, num_workers=workers)
    return read_answers(parts)


@pytest.mark.parametrize("arch, mode", [("llava", "score"), ("qwen2vl", "score"), ("qwen2vl", "generate")])
def test_workers_give_the_same_answers_as_the_main_process(arch, mode, photos, tmp_path, request):  # noqa: F811
    ds, records, names = _split(photos)
    # backend batches of 3 inside stage batches of 4: the workers split them as choose() does
    model = request.getfixturevalue(f"{arch}_dir")
    backend = TransformersBackend(str(model), mode=mode, device="cpu", batch_size=3, max_new_tokens=3)
    calls = []
    real = backend.choose
    backend.choose = lambda work: calls.append(type(work).__name__) or real(work)
    main = _run(tmp_path, backend, names, ds, records, workers=0)
    in_main = list(calls)
    calls.clear()
    workers = _run(tmp_path, backend, names, ds, records, workers=2)
    assert in_main == ["list"] * 2  # no workers: plain requests, prepared by choose() itself
    assert calls == ["PreparedBatch"] * 3  # (3 + 1) + 2: forward-sized, prepared in the workers
    assert sorted(main) == sorted(workers) == list(range(N))
    assert backend.calls == 2 * N
    for i in range(N):
        assert workers[i] == main[i]  # choice, raw text, scores: equal, not merely close
    if mode == "score":
        assert all(len(main[i].scores) == 3 for i in range(N))


def test_workers_attach_the_same_in_context_examples(llava_dir, photos, photo_dataset, tmp_path):  # noqa: F811
    ds, records, names = _split(photos)
    data_dir, kshot = photo_dataset
    pool = ExemplarPool.from_source(str(data_dir), str(kshot), "train", max_examples=2)
    backend = TransformersBackend(
        str(llava_dir), device="cpu", batch_size=4, prompt=PromptConfig(max_images=3)
    )
    stage = LVLMStage(backend, names, pool)
    rows = [
        ds[i] | {"index": i, "candidate_ids": records[i].clip_topk[:3], "key": f"test/{i}"} for i in range(N)
    ]
    _, work = stage.collate(workers=2)(rows)
    assert all(len(r.examples) == 2 for b in work.batches for r in b.requests)  # examples reached the prompts
    main = _run(tmp_path, backend, names, ds, records, workers=0, exemplars=pool)
    workers = _run(tmp_path, backend, names, ds, records, workers=2, exemplars=pool)
    assert main == workers


def test_collate_keeps_images_out_of_the_rows_and_splits_by_forward(qwen2vl_dir, photos):  # noqa: F811
    names = sorted(photos)
    backend = TransformersBackend(str(qwen2vl_dir), device="cpu", batch_size=2).load()
    stage = LVLMStage(backend, names)
    image = photos["cat"].resize((56, 56))
    batch = [{"index": i, "image": image, "candidate_ids": [i, i + 1], "key": f"test/{i}"} for i in range(5)]
    rows, work = stage.collate(workers=2)(batch)
    assert rows == [{"index": i, "candidate_ids": [i, i + 1], "key": f"test/{i}"} for i in range(5)]
    assert isinstance(work, PreparedRequests) and [len(b) for b in work.batches] == [2, 2, 1]
    rows0, requests = stage.collate(workers=0)(batch)
    assert rows0 == rows and [r.candidates for r in requests] == [[names[i], names[i + 1]] for i in range(5)]
    assert stage.predict_step((rows, work)) == stage.predict_step(batch)  # a plain list of rows works too


def test_prepared_batch_sends_images_as_tensors_and_gives_them_back(qwen2vl_dir, photos):  # noqa: F811
    """A worker's batch pickles its images as uint8 tensors (shared memory in a DataLoader), not PIL
    images; a backend with smaller batches (as after an out-of-memory) re-prepares it from the same pixels."""
    import pickle

    import numpy as np
    from PIL import Image

    from cascadevlm.lvlm.base import Exemplar, LVLMRequest

    gray = photos["coins"].convert("L").resize((30, 20))
    reqs = [
        LVLMRequest(image=photos["cat"].resize((50, 40)), candidates=["cat", "horse"], key="a"),
        LVLMRequest(image=gray, candidates=["coins", "china", "cat"], key="b",
                    examples=[Exemplar(photos["horse"].resize((30, 30)), "horse")]),
    ]  # fmt: skip
    backend = TransformersBackend(str(qwen2vl_dir), device="cpu", batch_size=2)
    sent = pickle.loads(pickle.dumps(backend.prepare(reqs)))
    assert all(r.image is None for r in sent.requests)  # nothing PIL travelled
    back = sent.original_requests()
    for r, b in zip(reqs, back, strict=True):
        assert isinstance(b.image, Image.Image) and b.image.mode == r.image.mode
        assert np.array_equal(np.asarray(b.image), np.asarray(r.image))
    assert np.array_equal(np.asarray(back[1].examples[0].image), np.asarray(reqs[1].examples[0].image))
    one = TransformersBackend(str(qwen2vl_dir), device="cpu", batch_size=1)
    assert one.choose(sent) == one.choose(reqs)


@pytest.mark.slow
def test_evaluate_with_lvlm_workers_keeps_the_run_name_and_the_records(
    tiny_clip_path,
    data_root,
    llava_dir,  # noqa: F811
    tmp_path,
):
    """evaluate.py with --data.num_workers 2 (CLIP and LVLM stages in workers) names the run as with 0
    and writes the same records: the worker count changes no answer, so it is in no name."""
    from cascadevlm.cli import run_evaluate as main
    from cascadevlm.records import read_records

    def run(workers: int):
        out = tmp_path / f"w{workers}"
        main([
            "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", "12",
            "--data.num_workers", str(workers), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false",
            "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
            "--lvlm.init_args.model", str(llava_dir), "--lvlm.init_args.device", "cpu",
            "--lvlm.init_args.batch_size", "3", "--cascade.lvlm_batch_size", "4",
            "--cascade.tau", "-inf", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
        ])  # fmt: skip
        (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
        return run_dir.name, read_records(run_dir / "records.parquet")

    name0, records0 = run(0)
    name2, records2 = run(2)
    assert name0 == name2
    assert len(records0) == 12 and all(r.deferred and r.lvlm_scores for r in records0)
    assert records2 == records0
