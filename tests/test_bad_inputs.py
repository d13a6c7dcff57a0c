"""A table of bad inputs, each with its exact one-line message.

Objects are built directly where no process is needed (options, gate, records, stage bookkeeping, data
module, CLIP loading, API backend, provenance, tables); a few go through the evaluate entry point
in-process to pin the ``error: ...`` line. ``{tmp}``, ``{photos}`` and ``{clip}`` in a message stand for the
test's temporary directory, the photo-folder dataset and the tiny CLIP checkpoint. Messages of the data layer and the API backend come
from /work/notes/errors_data.md and errors_api.md (their owners' lists), near the end of the table.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cascadevlm.cascade.evaluate import CascadeOptions, Threshold, check_options, combine, parse_threshold
from cascadevlm.cascade.lvlm_stage import (
    LVLMResult,
    LVLMStage,
    check_stage_fingerprint,
    write_stage_fingerprint,
)
from cascadevlm.cli import evaluate_main
from cascadevlm.gating.gate import tau_for_budget
from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.records import PredictionRecord, append_json_lines, read_json_lines, read_records
from cascadevlm.report.analysis import final_at_tau

TEN = [f"c{i}" for i in range(10)]


def _dm(**kw):
    base = dict(name="fashion_mnist", split="test", class_names=TEN, batch_size=32, limit=None, shots=0,
                dsd={"train": 0, "val": 0, "test": 0})  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def _opts(**kw):
    if "tau" in kw:
        kw["tau"] = Threshold(kw["tau"])
    return CascadeOptions(**kw)


def _rec(i=0, topk=(1, 2, 3), entropy=1.0, **kw):
    return PredictionRecord(index=i, label=1, clip_topk=list(topk), clip_topk_probs=[0.3] * len(topk),
                            entropy=entropy, clip_pred=topk[0], **kw)  # fmt: skip


class _Backend(LVLMBackend):
    def __init__(self, answers):
        self.answers = answers

    def choose(self, requests):
        return self.answers


def _stage(answers):
    stage = LVLMStage(_Backend(answers), TEN)
    batch = [{"index": 0, "image": None, "candidate_ids": [1, 2, 3], "key": "test/0"}]
    stage.predict_step(batch)


def _fingerprint_mismatch(ctx):
    parts = ctx.tmp / "parts"
    write_stage_fingerprint(parts, {"lvlm": {"model": "a"}, "data": {"templates": ["x {}"]}})
    append_json_lines(parts / "lvlm.rank0.jsonl", [LVLMResult(0, [1, 2], 1, "", None, None)])
    check_stage_fingerprint(parts, {"lvlm": {"model": "b"}, "data": {"templates": ["y {}"]}})


def _bad_json_lines(ctx):
    p = ctx.tmp / "a.jsonl"
    p.write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    read_json_lines(p, dict, "LVLM answer")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _api(**kw):
    from cascadevlm.lvlm.api_backend import OpenAIBackend

    return OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", api_key_env=None, cache_path=None, **kw)


def _lvlm(model, **kw):
    from cascadevlm.lvlm.transformers_backend import TransformersBackend

    return TransformersBackend(str(model), device="cpu", **kw)


def _lvlm_folder(
    ctx, weights: str | None = None, tokenizer: bool = True, arch: str = "LlavaForConditionalGeneration"
):
    """A model folder ``{tmp}/m``: a config.json, weights (a real safetensors file, or the text given) and
    a tokenizer file."""
    folder = _write(ctx.tmp / "m" / "config.json", json.dumps({"architectures": [arch]})).parent
    if weights is None:
        shutil.copy(ctx.clip, folder / "model.safetensors")
    else:
        _write(folder / "model.safetensors", weights)
    if tokenizer:
        _write(folder / "tokenizer.json", "{}")
    return folder


def _other_lora(ctx):
    """A LoRA folder ``{tmp}/lora`` that peft made for a LLaVA."""
    lora = _write(ctx.tmp / "lora" / "adapter_config.json", json.dumps(
        {"auto_mapping": {"base_model_class": "LlavaForConditionalGeneration"}, "base_model_name_or_path": "llava"}
    )).parent  # fmt: skip
    shutil.copy(ctx.clip, lora / "adapter_model.safetensors")
    return str(lora)


def _data(ctx, **kw):
    from cascadevlm.data.datamodule import CascadeDataModule

    return CascadeDataModule(dataset=str(ctx.photos), **kw)


def _clip(ctx, name="cascadevlm-tiny-vit", pretrained=None, **kw):
    from cascadevlm.clip.model import load_clip

    return load_clip(name, pretrained, **kw)


def _truncated(ctx) -> str:
    data = ctx.clip.read_bytes()
    path = ctx.tmp / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _demo_without_weights(ctx):
    from cascadevlm.lvlm.transformers_backend import load_model_and_processor

    demo = Path(__file__).resolve().parents[1] / "cascadevlm" / "zoo" / "checkpoints"
    copy = ctx.tmp / "checkpoints"
    shutil.copytree(demo / "llava", copy / "llava", ignore=shutil.ignore_patterns("model.safetensors"))
    manifest = json.loads((demo / "manifest.json").read_text())
    # a listed sha256 of our own: the message stays the same when the demo is retrained
    manifest["files"]["llava/model.safetensors"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_model_and_processor(str(copy / "llava"), device="cpu")


def _subfolder(ctx, name: str, folders: list[str]):
    """An image folder ``{tmp}/name`` with one photo of the photo folder in each of ``folders``."""
    photo = next(ctx.photos.rglob("*.jpg"))
    for folder in folders:
        (ctx.tmp / name / folder).mkdir(parents=True)
        shutil.copy(photo, ctx.tmp / name / folder / photo.name)
    return ctx.tmp / name


def _saved(ctx, rows: int, names=("cat", "dog"), int_labels=False):
    """A ``save_to_disk`` dataset ``{tmp}/saved`` with a test split of ``rows`` rows, columns img / category
    (a ClassLabel of ``names``, or plain integers)."""
    import datasets

    photo = next(ctx.photos.rglob("*.jpg")).read_bytes()
    label = datasets.Value("int64") if int_labels else datasets.ClassLabel(names=list(names))
    features = datasets.Features({"img": datasets.Image(), "category": label})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": photo, "path": None}] * rows, "category": [0] * rows},
                                    features=features)  # fmt: skip
    datasets.DatasetDict({"test": ds}).save_to_disk(str(ctx.tmp / "saved"))
    return ctx.tmp / "saved"


def _mark(ctx, target, info):
    from cascadevlm.provenance import write_provenance

    return write_provenance(target, info)


def _prompts():
    import cascadevlm.lvlm.prompts as prompts

    return prompts


def _registry():
    import cascadevlm.data.registry as registry

    return registry


def _tables(ctx):
    from cascadevlm.report.tables import collect_results

    (ctx.tmp / "unfinished").mkdir()
    collect_results([ctx.tmp / "unfinished"])


def _tables_main(argv):
    from cascadevlm.report.tables import main

    main.__wrapped__(argv)  # the function itself, without the one-line wrapper of the entry point


def _kshot_dups(ctx):
    from cascadevlm.report.kshot import aggregate

    rows = [{"dataset": "d", "method": "m", "shots": 1, "seed": 1, "path": "a/metrics.json", "acc1": 0.5},
            {"dataset": "d", "method": "m", "shots": 1, "seed": 1, "path": "b/metrics.json", "acc1": 0.6}]  # fmt: skip
    aggregate(rows)


NAN = float("nan")
# (id, call(ctx), exception type, exact message)
CASES = [
    # ---- cascade options (checked before any stage)
    ("budget>1", lambda c: check_options(_opts(budget=1.5), _dm(), True), ValueError,
     "cascade.budget must be a fraction in [0, 1], got 1.5"),
    ("budget<0", lambda c: check_options(_opts(budget=-0.1), _dm(), True), ValueError,
     "cascade.budget must be a fraction in [0, 1], got -0.1"),
    ("budget split missing", lambda c: check_options(_opts(budget=0.2), _dm(dsd={"train": 0, "test": 0}), True),
     ValueError, "dataset 'fashion_mnist' has no split 'val' to choose tau on (cascade.budget_split); it has "
     "['train', 'test']: set --cascade.budget_split, or give tau: --cascade.budget null --cascade.tau X"),
    ("topk 0", lambda c: check_options(_opts(topk=0), _dm(), True), ValueError,
     "cascade.topk must be between 1 and the number of classes (10), got 0"),
    ("topk -1", lambda c: check_options(_opts(topk=-1), _dm(), False), ValueError,
     "cascade.topk must be between 1 and the number of classes (10), got -1"),
    ("topk > classes", lambda c: check_options(_opts(topk=11), _dm(), True), ValueError,
     "cascade.topk must be between 1 and the number of classes (10), got 11"),
    ("lvlm_batch_size 0", lambda c: check_options(_opts(lvlm_batch_size=0), _dm(), True), ValueError,
     "cascade.lvlm_batch_size must be >= 1, got 0"),
    ("data.batch_size 0", lambda c: check_options(_opts(), _dm(batch_size=0), True), ValueError,
     "data.batch_size must be >= 1, got 0"),
    ("data.limit 0", lambda c: check_options(_opts(), _dm(limit=0), True), ValueError,
     "data.limit must be >= 1 (or null for every image), got 0; set --data.limit"),
    ("data.limit -3", lambda c: check_options(_opts(), _dm(limit=-3), False), ValueError,
     "data.limit must be >= 1 (or null for every image), got -3; set --data.limit"),
    ("tau NaN", lambda c: check_options(_opts(tau=NAN), _dm(), True), ValueError,
     "cascade.tau is NaN: give a number, inf (CLIP only) or -inf (the LVLM on every image)"),
    ("sweep_points 1", lambda c: check_options(_opts(sweep_points=1), _dm(), True), ValueError,
     "cascade.sweep_points must be >= 2, got 1"),
    ("incontext without shots", lambda c: check_options(_opts(incontext_shots=2), _dm(), True), ValueError,
     "cascade.incontext_shots needs a k-shot split: set data.shots >= 1"),
    ("incontext < 0", lambda c: check_options(_opts(incontext_shots=-1), _dm(), True), ValueError,
     "cascade.incontext_shots must be >= 0, got -1"),
    ("max_examples < 0", lambda c: check_options(_opts(max_examples=-2), _dm(), True), ValueError,
     "cascade.max_examples must be >= 0, got -2"),
    ("tau text", lambda c: parse_threshold("high"), ValueError, "expected a number, inf or -inf, got 'high'"),
    ("tau null", lambda c: parse_threshold(None), ValueError, "expected a number, inf or -inf, got None"),
    ("tau bool", lambda c: parse_threshold(True), ValueError, "expected a number, inf or -inf, got True"),
    # ---- gate
    ("budget on empty split", lambda c: tau_for_budget([], 0.5), ValueError,
     "cannot choose tau for a budget from an empty set of images"),
    ("gate budget 2", lambda c: tau_for_budget([0.1], 2.0), ValueError,
     "deferral budget must be a fraction in [0, 1], got 2.0"),
    # ---- records and stage bookkeeping
    ("records file missing", lambda c: read_records(c.tmp / "none.parquet"), FileNotFoundError,
     "records file '{tmp}/none.parquet' does not exist"),
    ("bad JSON line", _bad_json_lines, ValueError, "{tmp}/a.jsonl: line 2 is not a JSON LVLM answer"),
    ("fingerprint mismatch", _fingerprint_mismatch, ValueError,
     "{tmp}/parts holds LVLM answers from another LVLM configuration (differs in: data.templates, lvlm.model); "
     "use another --run_name or delete that directory to start over"),
    ("answer for other candidates", lambda c: combine([_rec()], {0: LVLMResult(0, [2, 1, 3], 2, "", None, None)},
     -math.inf, 3), RuntimeError, "stored LVLM answer for image 0 was given other candidates"),
    ("deferred without answer", lambda c: combine([_rec()], {}, -math.inf, 3), RuntimeError,
     "image 0 was deferred but has no LVLM answer"),
    ("sweep past the answers", lambda c: final_at_tau([_rec(entropy=2.0)], 1.0), ValueError,
     "image 0 would be deferred at tau=1.0 but has no LVLM answer"),
    ("backend answer count", lambda c: _stage([]), RuntimeError, "backend returned 0 answers for 1 requests"),
    ("backend choice out of range", lambda c: _stage([LVLMAnswer(choice=3, raw="")]), RuntimeError,
     "backend chose position 3 among 3 candidates"),
    ("no candidates", lambda c: _prompts().build_prompt(LVLMRequest(image=None, candidates=[]), _prompts().PromptConfig()),
     ValueError, "an LVLM request needs at least one candidate class name"),
    ("in-context without a train split", lambda c: check_options(_opts(incontext_shots=1), _dm(shots=2,
     dsd={"test": 0}), True), ValueError, "dataset 'fashion_mnist' has no split 'train' to draw k-shot images from "
     "(cascade.incontext_shots); it has ['test']: set --data.train_split"),
    # ---- report tables
    ("unfinished run in a table", _tables, FileNotFoundError,
     "{tmp}/unfinished has no metrics.json (the run did not finish): rerun it or leave it out"),
    ("no finished run for a table", lambda c: _tables_main([str(c.tmp)]), FileNotFoundError,
     "no finished run (a directory with metrics.json) in {tmp}"),
    ("duplicate seeds in k-shot table", _kshot_dups, ValueError,
     "d m k=1: seed(s) [1] appear in more than one run: ['a', 'b']"),
    # ---- provenance marks
    ("mark kind", lambda c: _mark(c, c.tmp, {"kind": "pretrained", "description": "x"}), ValueError,
     "provenance kind must be one of ('random', 'trained-demo'), got 'pretrained'"),
    ("mark description", lambda c: _mark(c, c.tmp, {"kind": "random"}), ValueError,
     "provenance needs a 'description' string"),
    ("mark missing file", lambda c: _mark(c, c.tmp / "w.safetensors", {"kind": "random", "description": "x"}),
     FileNotFoundError, "cannot mark '{tmp}/w.safetensors': no such file or directory"),
    ("mark other format", lambda c: _mark(c, _write(c.tmp / "w.bin", "x"), {"kind": "random", "description": "x"}),
     ValueError, "provenance marks go into .safetensors files or model directories, not '{tmp}/w.bin'"),
    # ---- CLIP loading (errors_data.md)
    ("precision", lambda c: _clip(c, precision="bf32"), ValueError,
     "unknown CLIP precision 'bf32'; use one of fp32, fp16, bf16, amp, amp_bf16, amp_bfloat16, pure_fp16, pure_bf16 "
     "(--model.precision)"),
    ("unknown architecture", lambda c: _clip(c, "ViT-Q-99"), ValueError,
     "unknown CLIP model 'ViT-Q-99': not an open_clip architecture (a custom one needs --model.model_config "
     "<ViT-Q-99.json>)."),
    ("model config missing", lambda c: _clip(c, "my-arch", model_config=str(c.tmp / "x.json")), ValueError,
     "model config '{tmp}/x.json' does not exist; fix --model.model_config"),
    ("model config name", lambda c: _clip(c, "other-arch", model_config=str(_write(c.tmp / "my-arch.json", "{}"))),
     ValueError, "model config '{tmp}/my-arch.json' defines architecture 'my-arch' (open_clip names a config by its "
     "file name) but model_name is 'other-arch'; set --model.model_name my-arch"),
    ("model config keys", lambda c: _clip(c, "bad", model_config=str(_write(c.tmp / "bad.json", "{}"))), ValueError,
     "model config '{tmp}/bad.json' lacks ['embed_dim', 'vision_cfg', 'text_cfg'] (an open_clip model config has "
     "embed_dim, vision_cfg, text_cfg); fix --model.model_config"),
    ("local-dir missing", lambda c: _clip(c, "local-dir:/nope"), FileNotFoundError,
     "CLIP model directory '/nope' does not exist"),
    ("text file as checkpoint", lambda c: _clip(c, pretrained=str(_write(c.tmp / "w.safetensors", "hello"))),
     ValueError, "CLIP checkpoint '{tmp}/w.safetensors' cannot be read (SafetensorError: Error while deserializing "
     "header: header too small): it is truncated or not a weights file; set --model.pretrained to an open_clip "
     "checkpoint or tag"),
    ("junk as checkpoint", lambda c: _clip(c, pretrained=str(_write(c.tmp / "w.pt", "junk" * 50))), ValueError,
     "CLIP checkpoint '{tmp}/w.pt' cannot be read (not a safetensors or PyTorch checkpoint): it is truncated or not a weights file; set "
     "--model.pretrained to an open_clip checkpoint or tag"),
    ("truncated checkpoint", lambda c: _clip(c, pretrained=_truncated(c)), ValueError,
     "CLIP checkpoint '{tmp}/cut.safetensors' cannot be read (SafetensorError: Error while deserializing header: "
     "incomplete metadata, file not fully covered): it is truncated or not a weights file; set --model.pretrained "
     "to an open_clip checkpoint or tag"),
    ("checkpoint of another architecture", lambda c: _clip(c, "cascadevlm-small-vit", pretrained=str(c.clip)), ValueError,
     "CLIP checkpoint '{clip}' does not fit architecture 'cascadevlm-small-vit' (AssertionError: text pos_embed width "
     "changed!); set --model.model_name to the architecture it was trained as"),
    ("unknown pretrained tag", lambda c: _clip(c, "RN50", pretrained="laion_nope"), ValueError,
     "unknown pretrained tag 'laion_nope' for CLIP model 'RN50' (its tags: openai, yfcc15m, cc12m); set "
     "--model.pretrained to one of them or to a checkpoint file"),
    ("demo LVLM folder missing a file", _demo_without_weights, ValueError,
     "{tmp}/checkpoints/llava/model.safetensors differs from {tmp}/checkpoints/manifest.json (it is missing, the "
     "manifest says 000000000000...): these are not the project's demo weights; restore them (git checkout -- "
     "{tmp}/checkpoints) or give other weights (--lvlm.init_args.model)"),
    # ---- data module (errors_data.md)
    ("eval split missing", lambda c: _data(c, split="val"), ValueError,
     "dataset '{photos}' has no split 'val'; it has ['train', 'test']: set --data.split"),
    ("train split missing", lambda c: _data(c, train_split="trainval").kshot_split(1, 1), ValueError,
     "dataset '{photos}' has no split 'trainval' to draw k-shot images from; it has ['train', 'test']: "
     "set --data.train_split"),
    ("data limit 0", lambda c: _data(c, limit=0), ValueError,
     "data.limit must be >= 1 (or null for every image), got 0; set --data.limit"),
    ("fewer class names than labels", lambda c: _data(c, class_names=["a", "b"]), ValueError,
     "dataset 'photos' has 3 classes in its label feature but 2 class names"),
    ("duplicate class names", lambda c: _data(c, class_names=["a", "a", "b"]), ValueError,
     "dataset 'photos' has duplicate class names: ['a']"),
    ("empty class-names file", lambda c: _data(c, class_names=str(_write(c.tmp / "names.txt", "\n"))), ValueError,
     "class-names file '{tmp}/names.txt' (--data.class_names) has an empty class list; at least one class name is "
     "needed"),
    ("duplicated class-names file", lambda c: _data(c, class_names=str(_write(c.tmp / "names.txt", "a\nb\nA\n"))),
     ValueError, "class-names file '{tmp}/names.txt' (--data.class_names) has duplicate class names: ['A']"),
    ("one-class image folder", lambda c: _data(SimpleNamespace(photos=_subfolder(c, "one", ["train/cat", "test/cat"]))),
     ValueError, "image folder '{tmp}/one' has one class (cat): classification needs at least two class folders"),
    ("one-class dataset", lambda c: _data(SimpleNamespace(photos=_saved(c, 2, names=["cat"]))), ValueError,
     "dataset 'saved' has one class ('cat'); classification needs at least two (--data.dataset, --data.class_names)"),
    ("empty dataset", lambda c: _data(SimpleNamespace(photos=_saved(c, 0))), ValueError,
     "dataset directory '{tmp}/saved': split 'test' is empty (no images); prepare the dataset again or remove that "
     "split"),
    ("label column holds images", lambda c: _data(SimpleNamespace(photos=_saved(c, 2)), label_column="img"),
     ValueError, "split 'test' of '{tmp}/saved': column 'img' (--data.label_column) holds images, not class labels; "
     "the class labels are in ['category']"),
    ("image column holds labels", lambda c: _data(SimpleNamespace(photos=_saved(c, 2)), image_column="category"),
     ValueError, "split 'test' of '{tmp}/saved': column 'category' (--data.image_column) holds class labels, not "
     "images; the images are in ['img']"),
    ("image column holds integers", lambda c: _data(SimpleNamespace(photos=_saved(c, 2, int_labels=True)),
     image_column="category"), ValueError, "split 'test' of '{tmp}/saved': column 'category' (--data.image_column) "
     "holds class labels, not images; the images are in ['img']"),
    ("template without a slot", lambda c: _data(c, templates=["a photo of a {c}.", "a photo"]), ValueError,
     "prompt templates must contain '{{}}' or '{{c}}' where the class name goes, once; --data.templates has "
     "['a photo']"),  # braces doubled: the expected message is formatted
    ("empty class list", lambda c: _registry().validate_class_names([], "dataset 'x'"), ValueError,
     "dataset 'x' has an empty class list; at least one class name is needed"),
    ("not a dataset dir", lambda c: _data(SimpleNamespace(photos=_write(c.tmp / "empty" / "x.txt", "x").parent)),
     ValueError, "dataset directory '{tmp}/empty' is not an image folder: "),
    # ---- API backend construction (errors_api.md)
    ("api max_concurrency", lambda c: _api(max_concurrency=0), ValueError,
     "lvlm.init_args.max_concurrency must be >= 1, got 0"),
    ("api stage_batch_size", lambda c: _api(stage_batch_size=0), ValueError,
     "lvlm.init_args.stage_batch_size must be >= 1, got 0"),
    ("api top_logprobs", lambda c: _api(top_logprobs=0), ValueError, "lvlm.init_args.top_logprobs must be >= 1, got 0"),
    ("api requests_per_minute", lambda c: _api(requests_per_minute=0), ValueError,
     "lvlm.init_args.requests_per_minute must be > 0 or null, got 0"),
    ("api max_pixels", lambda c: _api(max_pixels=0), ValueError, "lvlm.init_args.max_pixels must be >= 1 or null, got 0"),
    ("api mode", lambda c: _api(mode="chat"), ValueError, "lvlm.init_args.mode must be generate or score, got 'chat'"),
    ("api guided_choice", lambda c: _api(guided_choice="json"), ValueError,
     "lvlm.init_args.guided_choice must be false, true, structured_outputs, guided_choice or regex, got 'json'"),
    ("api score with names", lambda c: _api(mode="score", prompt=__import__("cascadevlm.lvlm.prompts", fromlist=["x"])
     .PromptConfig(options="names")), ValueError,
     "lvlm.init_args.mode score reads the log-probabilities of the answer letter and needs lettered options: set "
     "lvlm.init_args.prompt.options letters (got 'names') or lvlm.init_args.mode generate"),
    ("api score with guided", lambda c: _api(mode="score", guided_choice=True), ValueError,
     "lvlm.init_args.guided_choice constrains generated answers (mode generate); score mode already reads every "
     "letter's log-probability: set guided_choice false"),
    ("api max_consecutive_failures", lambda c: _api(max_consecutive_failures=-1), ValueError,
     "lvlm.init_args.max_consecutive_failures must be >= 0, got -1"),
    # ---- LVLM and LoRA folders (cascadevlm/lvlm/folders.py; more in tests/test_lvlm_folders.py)
    ("lvlm image folder", lambda c: _lvlm(c.photos), ValueError,
     "LVLM folder '{photos}' has no config.json (it holds images: a dataset folder, not a model); set "
     "lvlm.init_args.model to a folder that save_pretrained wrote (config.json, *.safetensors, tokenizer and "
     "processor files) or a hub id"),
    ("lvlm junk safetensors", lambda c: _lvlm(_lvlm_folder(c, weights="junk" * 50)), ValueError,
     "{tmp}/m/model.safetensors is not a complete safetensors file (header too large): download or copy it "
     "again, or set lvlm.init_args.model to another folder"),
    ("lvlm no tokenizer", lambda c: _lvlm(_lvlm_folder(c, tokenizer=False)), ValueError,
     "LVLM folder '{tmp}/m' has no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, ...): copy "
     "them from the model's release (processor.save_pretrained writes them) or set lvlm.init_args.model"),
    ("lora missing", lambda c: _lvlm(_lvlm_folder(c), lora_path=str(c.tmp / "nope")), FileNotFoundError,
     "LoRA folder '{tmp}/nope' does not exist; set lvlm.init_args.lora_path to a folder with "
     "adapter_config.json (peft's save_pretrained, train.py's lora_adapter), or null"),
    ("lora not an adapter", lambda c: _lvlm(_lvlm_folder(c), lora_path=str(c.photos)), ValueError,
     "LoRA folder '{photos}' has no adapter_config.json, so it is no peft adapter; set "
     "lvlm.init_args.lora_path to a folder that peft's save_pretrained wrote, or null"),
    ("lora for another model", lambda c: _lvlm(_lvlm_folder(c, arch="Qwen2VLForConditionalGeneration"),
     lora_path=_other_lora(c)), ValueError,
     "LoRA adapter '{tmp}/lora' was made for LlavaForConditionalGeneration (llava), not for '{tmp}/m' "
     "(Qwen2VLForConditionalGeneration): set lvlm.init_args.lora_path to an adapter trained on this model, "
     "or lvlm.init_args.model to the adapter's base model"),
]  # fmt: skip


@pytest.fixture
def ctx(tmp_path, photo_folder, tiny_clip_path):
    photos = tmp_path / "photos"
    shutil.copytree(photo_folder, photos)
    return SimpleNamespace(tmp=tmp_path, photos=photos, clip=tiny_clip_path)


@pytest.mark.parametrize(("call", "exc", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_its_one_line_message(ctx, call, exc, message):
    with pytest.raises(exc) as err:
        call(ctx)
    expected = message.format(tmp=ctx.tmp, photos=ctx.photos, clip=ctx.clip)
    got = err.value.args[0] if isinstance(err.value, KeyError) else str(err.value)
    assert "\n" not in got
    if expected.endswith(": "):  # the tail is another library's wording
        assert got.startswith(expected)
    else:
        assert got == expected


# A handful through the entry point, for the ``error: ...`` line itself (parse errors included).
CLI_CASES = [
    (["--model.modle_name", "x"], "error: unrecognized arguments: --model.modle_name x"),
    (["--cascade.lvlm_on", "some"], 'error: Parser key "cascade.lvlm_on": Expected a typing.Literal[\'deferred\', \'all\']. '
     "Got value: some"),
    (["--cascade.topk", "five"], 'error: Parser key "cascade.topk": Expected a <class \'int\'>. Got value: five'),
    (["--cascade.tau", "high"], 'error: Parser key "cascade.tau": Not of type Threshold: expected a number, inf or '
     "-inf, got 'high'"),
    (["--config", "{tmp}/missing.yaml"], None),
    (["--data.limit", "0"], "error: data.limit must be >= 1 (or null for every image), got 0; set --data.limit"),
    (["--cascade.budget", "7"], "error: cascade.budget must be a fraction in [0, 1], got 7.0"),
    (["--data.templates", '["a photo of a {{c}}.", "a photo"]'], "error: prompt templates must contain '{}' or "
     "'{c}' where the class name goes, once; --data.templates has ['a photo']"),  # before any stage: no run dir
    (["--model.class_batch_size", "0"], "error: model.class_batch_size must be >= 1, got 0; set "
     "--model.class_batch_size"),
    (["--cascade.budget", "nan"], "error: --cascade.budget: expected a finite number or null, got nan (NaN and "
     "infinity are not accepted here)"),
    (["--cascade.fusion_weight", "inf"], "error: --cascade.fusion_weight: expected a finite number or null, got inf "
     "(NaN and infinity are not accepted here)"),
    (["--cascade.budget", "half"], "error: --cascade.budget: expected a number or null, got half"),
    (["--model.pretrained", "laion_nope"], "error: unknown pretrained tag 'laion_nope' for CLIP model "
     "'cascadevlm-tiny-vit' (it has no pretrained tags); set --model.pretrained to one of them or to a checkpoint file"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "line"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_entry_point_prints_one_error_line(
    tiny_clip_path, photo_folder, tmp_path, capsys, monkeypatch, args, line
):
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    base = ["--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
            "--data.dataset", str(photo_folder), "--trainer.accelerator", "cpu",
            "--lvlm.class_path", "cascadevlm.testing.fake_lvlm.FakeLVLM", "--cascade.topk", "3",
            "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        evaluate_main([*base, *[a.format(tmp=tmp_path) for a in args]])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    if line is None:
        assert err[-1].startswith("error: ") and "missing.yaml" in err[-1]
    else:
        assert err[-1] == line
    assert not (tmp_path / "runs").exists()


# ---- prepare (python -m cascadevlm.data.prepare / cascadevlm-prepare): bad downloads, through the entry point
def _mirror(ctx, names="a\nb\n", shards=2, nshards=None, cut=None) -> str:
    """A webdataset mirror of ``shards`` test shards (two samples each; ``cut`` truncates shard 0 to
    that many bytes), with ``names`` as classnames.txt and ``nshards`` in test/nshards.txt."""
    import io
    import tarfile

    root = ctx.tmp / "wds_m"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text(names)
    if nshards is not None:
        (root / "test" / "nshards.txt").write_text(f"{nshards}\n")
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k, (ext, data) in enumerate([("cls", b"0"), ("jpg", b"x" * 600)] * 2):
                info = tarfile.TarInfo(f"s{s}{k // 2}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (root / "test" / f"{s}.tar").write_bytes(buf.getvalue()[:cut] if s == 0 else buf.getvalue())
    return str(root)


def _empty_shard(ctx) -> str:
    root = _mirror(ctx)
    with __import__("tarfile").open(f"{root}/test/1.tar", "w"):
        pass
    return root


PREPARE_CASES = [
    ("shard missing", lambda c: _mirror(c, nshards=3),
     "{tmp}/wds_m/test: nshards.txt says 3 shards but 2 are there (missing: 2.tar); download the missing shards again"),
    ("empty shard", _empty_shard,
     "{tmp}/wds_m/test/1.tar is an empty tar shard (no samples); download the shard again"),
    ("shard cut between members", lambda c: _mirror(c, cut=3 * 512 + 512 * 2),
     "{tmp}/wds_m/test/0.tar is truncated (it ends before the tar end-of-archive block); download the shard again"),
    ("shard cut inside a member", lambda c: _mirror(c, cut=700),
     "{tmp}/wds_m/test/0.tar is truncated or corrupt (unexpected end of data); download the shard again"),
    ("empty classnames.txt", lambda c: _mirror(c, names="\n"),
     "class-names file {tmp}/wds_m/classnames.txt has an empty class list; at least one class name is needed"),
    ("duplicated classnames.txt", lambda c: _mirror(c, names="a\nb\na\n"),
     "class-names file {tmp}/wds_m/classnames.txt has duplicate class names: ['a']"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mirror", "message"), [c[1:] for c in PREPARE_CASES], ids=[c[0] for c in PREPARE_CASES]
)
def test_prepare_prints_one_error_line(ctx, capsys, monkeypatch, mirror, message):
    from cascadevlm.data.prepare import main

    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["--wds", mirror(ctx), "--out", str(ctx.tmp / "out")])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=ctx.tmp)}\n"
    assert not (ctx.tmp / "out").exists()


def test_the_table_is_large_enough():
    assert len(CASES) + len(CLI_CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    json.dumps([c[3] for c in CASES])  # plain strings
