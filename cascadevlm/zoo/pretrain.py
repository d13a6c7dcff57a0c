"""Train the demo's miniature models on Fashion-MNIST's TRAIN split, on the CPU.

    python -m cascadevlm.zoo.pretrain [--out cascadevlm/zoo/checkpoints] [--seed 0]

Three models, the paper's premise in miniature (and issue 24's cheap second LVLM):

- **CLIP** (open_clip architecture ``cascadevlm-tiny-vit``, the real CLIP BPE tokenizer) trained
  contrastively on images and captions made from class names x the registry's prompt templates
  (a symmetric InfoNCE where captions of the image's class are its positives). The classes in
  :data:`LEFT_OUT` never appear in its training, neither their images nor their names, so zero-shot
  CLIP is weak on them and k-shot adaptation has something real to learn.
- **LLaVA** (``LlavaForConditionalGeneration``: a CLIP vision tower, a projector and a small Llama,
  from random weights) in two stages. Stage 1 stands in for the pretrained vision encoder a real LLaVA
  starts from: the vision tower and projector are trained as an image classifier (a temporary linear
  head on the mean image token, dropped afterwards). Stage 2 is full fine-tuning of every weight
  THROUGH the project's LVLM training module (:class:`cascadevlm.lvlm.lora.LoRAModule` with
  ``finetune="full"``, :class:`~cascadevlm.lvlm.lora.LoRADataModule`) on the cascade prompt: the image
  and five candidate classes as options, answered with the right candidate's name (the demo's prompt,
  ``options: names``). Each prompt names its candidates in ONE spelling drawn from
  :func:`name_schemes` (the registry's, the dataset's official ones, Title Case, plurals, synonyms,
  upper case), so the model must read the options rather than recall ten strings. Half of the training
  images get CLIP's top-5 in CLIP's order (from the CLIP trained above), the other half the true class
  among random distractors in random order. It sees all ten classes.
- **LLaVA small** (``llava_small/``): the same recipe on a smaller network (2-layer vision tower and
  2-layer Llama, 64 wide): cheaper per image and weaker, for a cost-budgeted cascade of several LVLMs.

All are saved the way a user's weights are loaded: ``clip.safetensors`` for
``load_clip("cascadevlm-tiny-vit", pretrained=PATH)``, ``llava/`` and ``llava_small/`` for
``AutoModelForImageTextToText.from_pretrained``, each with a provenance mark ``trained-demo``, plus
``manifest.json`` (sha256 per file, the command, data split, seed, recipe, validation accuracy, times).
Only the train split is used for training; the val split (5000 images held out of the official train
split) is used for the numbers in the manifest; the test split is never read. One torch thread and
seeded draws make a rerun of the same command give the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cascadevlm.flags import one_flag_style
from cascadevlm.zoo.miniature import CHECKPOINTS as DEFAULT_OUT
from cascadevlm.zoo.miniature import CLIP_CHECKPOINT, CLIP_MODEL, LEFT_OUT, spelling
from cascadevlm.zoo.miniature import LLAVA_DIR as _LLAVA
from cascadevlm.zoo.miniature import LLAVA_SMALL_DIR as _LLAVA_SMALL

log = logging.getLogger(__name__)

CLIP_FILE = CLIP_CHECKPOINT.name
LLAVA_DIR = _LLAVA.name
LLAVA_SMALL_DIR = _LLAVA_SMALL.name
NUM_CANDIDATES = 5
# Stage 2 names the candidates of each prompt in ONE of these schemes (all five in it), so the LLaVA must
# read the options rather than recall ten strings. By class id, as the registry orders them.
_PLURAL = ["t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags",
           "ankle boots"]  # fmt: skip
_SYNONYMS_A = [
    "tee",
    "pants",
    "sweater",
    "frock",
    "jacket",
    "flip-flop",
    "blouse",
    "trainer",
    "handbag",
    "boot",
]
_SYNONYMS_B = ["top", "slacks", "jumper", "gown", "overcoat", "sandals", "button-up shirt", "trainers", "purse",
               "boots"]  # fmt: skip
# FULL UPPER CASE is trained on: held out (--hold-out-upper) it cannot be read, since its BPE tokens share
# nothing with the lower-case ones (val, 400 steps: 11.8% on CLIP's most uncertain images, CLIP 30.3%).
# Lettered prompts are off: a quarter of them (800 steps) gave letters 32.2% (CLIP 30.3%) and cost the
# names; half of them, names 41.7% instead of 46.3% (docs/demo.md).
LETTERS_FRACTION = 0.0  # share of stage-2 prompts with lettered options, answered by letter


def name_schemes(class_names: list[str], train_upper: bool) -> dict[str, tuple[float, list[str]]]:
    """Stage 2's naming schemes: name -> (draw weight, names by class id). The registry's names (the
    demo's) are drawn most often; ``upper`` only with ``train_upper``."""
    schemes = {
        "registry": (3.0, spelling(class_names, "registry")),
        "official": (2.0, spelling(class_names, "official")),
        "title": (1.0, spelling(class_names, "title")),
        "plural": (1.0, list(_PLURAL)),
        "plural_title": (1.0, spelling(_PLURAL, "title")),
        "synonyms_a": (1.0, list(_SYNONYMS_A)),
        "synonyms_a_title": (1.0, spelling(_SYNONYMS_A, "title")),
        "synonyms_b": (1.0, list(_SYNONYMS_B)),
    }
    if train_upper:
        schemes["upper"] = (1.0, spelling(class_names, "upper"))
    return schemes


# ------------------------------------------------------------------------------------------------ data
def _split_arrays(dsd, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels of a saved Fashion-MNIST split."""
    ds = dsd[split]
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    from cascadevlm.data.loading import decode_image

    images = np.stack(
        [
            np.asarray(decode_image(v, f"{split} row {i}").convert("L"), dtype=np.uint8)
            for i, v in enumerate(ds["image"])
        ]
    )
    return images, np.asarray(ds["label"], dtype=np.int64)


def clip_pixels(images: np.ndarray, preprocess) -> torch.Tensor:
    """Images as the CLIP stage sees them: ``preprocess`` (open_clip's eval transform) on each PIL image."""
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(im)) for im in images])


# ------------------------------------------------------------------------------------------------ CLIP
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """Symmetric InfoNCE over a batch of (image, caption) pairs where every caption of the same class is
    a positive (plain CLIP's one-positive targets would push apart captions of one class)."""
    logits = scale * img @ txt.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()
    )


@torch.no_grad()
def clip_probs(bundle, pixels: torch.Tensor, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot probabilities over ``class_names`` with the project's zero-shot head."""
    from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits

    model = bundle.model.eval()
    head = build_zero_shot_head(model, bundle.tokenizer, class_names, templates)
    out = []
    for i in range(0, len(pixels), 512):
        out.append(
            clip_logits(model.encode_image(pixels[i : i + 512]), head, model.logit_scale.exp()).softmax(-1)
        )
    return torch.cat(out)


def train_clip(
    out_path: Path, train_x: torch.Tensor, train_y: np.ndarray, class_names: list[str], templates: list[str],
    steps: int, batch_size: int, lr: float, seed: int,
) -> dict:  # fmt: skip
    """Train ``CLIP_MODEL`` contrastively on the seen classes and save it with its provenance mark."""
    import open_clip
    from safetensors.torch import save_file

    from cascadevlm.clip.model import register_model_configs
    from cascadevlm.provenance import METADATA_KEY

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(CLIP_MODEL, pretrained=None).train()
    # The token embeddings stay at their seeded initialisation: training them would update 49408 x width
    # weights per step for the handful of words the captions use (and left-out names must stay unseen).
    model.token_embedding.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    seen = [c for c, n in enumerate(class_names) if n not in LEFT_OUT]
    keep = np.isin(train_y, seen)
    xs, ys = train_x[torch.from_numpy(keep)], torch.from_numpy(train_y[keep])
    # caption id = class * T + template; only seen classes' captions are ever encoded
    tokens = tokenizer([t.format(n) for n in class_names for t in templates])
    n_t = len(templates)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    rest = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(xs), (batch_size,), generator=gen)
        x, y = xs[idx], ys[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        cap = y * n_t + torch.randint(n_t, (batch_size,), generator=gen)
        uniq, inv = torch.unique(cap, return_inverse=True)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens[uniq]), dim=-1)[inv]
        loss = contrastive_loss(img, txt, y, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "CLIP step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - t0
            )
    seconds = time.perf_counter() - t0
    model.eval()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    mark = {
        "kind": "trained-demo",
        "description": f"{CLIP_MODEL} trained here by cascadevlm.zoo.pretrain on Fashion-MNIST's train split "
        f"(classes {', '.join(LEFT_OUT)} left out: never seen); not pretrained CLIP weights",
        "model_name": CLIP_MODEL,
        "left_out_classes": list(LEFT_OUT),
        "seed": seed,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={METADATA_KEY: json.dumps(mark)})
    return {"seconds": round(seconds, 1), "steps": steps, "batch_size": batch_size, "lr": lr,
            "train_images_seen_classes": int(keep.sum())}  # fmt: skip


# ------------------------------------------------------------------------------------------------ LLaVA
def demo_prompt_config():
    """The cascade prompt of the demo (configs/lvlm/demo_llava_score.yaml says the same)."""
    from cascadevlm.lvlm.prompts import PromptConfig

    return PromptConfig(dataset="fashion_mnist", options="names", max_images=1)


def _tokenizer(class_names: list[str], vocab_size: int):
    """tiny_lvlm's byte-level BPE, trained also on the demo's prompts so class names are whole words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cascadevlm.lvlm.prompts import user_text
    from cascadevlm.zoo.tiny_lvlm import _CORPUS, _LLAVA_TEMPLATE, _SPECIAL, _finish_tokenizer

    cfg = demo_prompt_config()
    letters = dataclasses.replace(cfg, options="letters")
    # every scheme, upper case included (held out of training or not, it must encode as words)
    schemes = [n for _, n in name_schemes(class_names, train_upper=True).values()]
    corpus = list(_CORPUS)
    for names in schemes:
        corpus += [user_text(c, names[i : i + 5]) for c in (cfg, letters) for i in range(0, len(names), 5)]
        corpus += [" ".join(names)]
    corpus += ["ASSISTANT: A B C D E"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(corpus * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096)
    return _finish_tokenizer(fast, "<s>", "</s>", "<pad>", _LLAVA_TEMPLATE)


# (vision layers, vision width, Llama layers, Llama width): the demo's LLaVA and its cheaper second one
LLAVA_SIZES = {"main": (4, 128, 3, 128), "small": (2, 64, 2, 64)}


def build_llava_init(out_dir: Path, class_names: list[str], seed: int, size: str = "main") -> Path:
    """A randomly initialised LLaVA to fine-tune: 28x28 images in 7-pixel patches (16 image tokens);
    ``main``: a 4-layer CLIP vision tower and a 3-layer Llama, 128 wide; ``small``: 2 vision layers and
    2 Llama layers, 64 wide (1 Llama layer stayed at chance after 400 steps)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from cascadevlm.zoo.tiny_lvlm import _save_generation_config

    v_layers, v_width, t_layers, t_width = LLAVA_SIZES[size]
    tokenizer = _tokenizer(class_names, vocab_size=1024)
    vision = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=v_layers, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=v_width,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t_width, intermediate_size=3 * t_width, num_hidden_layers=t_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _save_generation_config(model, tokenizer, "</s>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
        ),
        tokenizer=tokenizer, patch_size=7, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )  # fmt: skip
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def llava_pixels(images: np.ndarray, image_processor) -> torch.Tensor:
    """28x28 grayscale images as the LLaVA's CLIPImageProcessor gives them (no resize or crop at 28 px)."""
    x = torch.from_numpy(images).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(image_processor.image_mean)[None, :, None, None]
    std = torch.tensor(image_processor.image_std)[None, :, None, None]
    return (x - mean) / std


def pretrain_vision_tower(
    model_dir: Path, images: np.ndarray, labels: np.ndarray, steps: int, batch_size: int, lr: float, seed: int
) -> dict:
    """Stage 1: train the LLaVA's vision tower and projector as a classifier (a temporary linear head on
    the mean projected image token), in place in ``model_dir``."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    net = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    ref = processor.image_processor(images=[Image.fromarray(im).convert("RGB") for im in images[:4]],
                                    return_tensors="pt")["pixel_values"]  # fmt: skip
    if not torch.allclose(ref, llava_pixels(images[:4], processor.image_processor), atol=1e-5):
        raise RuntimeError("llava_pixels no longer matches the LLaVA image processor")
    torch.manual_seed(seed)
    width = net.config.text_config.hidden_size
    head = torch.nn.Linear(width, int(labels.max()) + 1)
    tower = [*net.model.vision_tower.parameters(), *net.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW([*tower, *head.parameters()], lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen).numpy()
        feats = net.model.get_image_features(
            pixel_values=llava_pixels(images[idx], processor.image_processor)
        )
        pooled = torch.stack(list(feats.pooler_output)).mean(1)  # (batch, width): mean image token
        loss = F.cross_entropy(head(pooled), torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("LLaVA stage 1 step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)  # fmt: skip
    net.eval().save_pretrained(model_dir)
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": steps, "batch_size": batch_size, "lr": lr}


def write_train_records(path: Path, probs: torch.Tensor, labels: np.ndarray, rows: np.ndarray) -> Path:
    """CLIP's top-k over the given train rows as prediction records (LoRADataModule's ``records_path``)."""
    from cascadevlm.records import PredictionRecord, write_records

    p, top = probs.topk(NUM_CANDIDATES, dim=-1)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    recs = [
        PredictionRecord(index=int(r), label=int(labels[r]), clip_topk=top[r].tolist(),
                         clip_topk_probs=p[r].tolist(), entropy=float(ent[r]), clip_pred=int(top[r, 0]))
        for r in rows
    ]  # fmt: skip
    return write_records(path, recs)


def train_llava(
    init_dir: Path, out_dir: Path, work: Path, dataset_dir: str, train_rows: list[int], records: Path,
    steps: int, batch_size: int, lr: float, seed: int, val_limit: int,
    schemes: dict[str, tuple[float, list[str]]] | None = None, letters_fraction: float = 0.0,
) -> dict:  # fmt: skip
    """Full fine-tuning through LoRAModule / LoRADataModule (the user's ``train.py`` classes), names
    drawn per prompt from ``schemes`` and ``letters_fraction`` of the prompts lettered."""
    import lightning as L

    from cascadevlm.data.kshot import KShotSplit
    from cascadevlm.lvlm.lora import LoRADataModule, LoRAModule

    labels = {}
    # the "k-shot split" here is every training row: a KShotSplit file is how the module takes rows
    import datasets

    y = np.asarray(datasets.load_from_disk(dataset_dir)["train"]["label"])
    for r in train_rows:
        labels.setdefault(int(y[r]), []).append(int(r))
    split = KShotSplit(
        dataset="fashion_mnist", k=max(len(v) for v in labels.values()), seed=seed, indices=labels
    )
    split_path = split.save(work / "train_rows.json")
    L.seed_everything(seed, workers=True, verbose=False)
    module = LoRAModule(
        model=str(init_dir), prompt=demo_prompt_config(), finetune="full", lr=lr, weight_decay=0.01,
        adapter_dir=str(work / "finetuned"), dtype="float32",
    )  # fmt: skip
    dm = LoRADataModule(
        dataset=dataset_dir, kshot_path=str(split_path), seed=seed, val_split="val", val_limit=val_limit,
        num_candidates=NUM_CANDIDATES, records_path=str(records), batch_size=batch_size,
        name_variants=[n for _, n in schemes.values()] if schemes else None,
        name_weights=[w for w, _ in schemes.values()] if schemes else None, letters_fraction=letters_fraction,
    )  # fmt: skip

    class _Log(L.Callback):  # the loss now and then (no progress bar, no logger)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % 100 == 0 or step == steps:
                log.info("LLaVA stage 2 step %d/%d loss %.3f (%.0f s)", step, steps, float(outputs["loss"]),
                         time.perf_counter() - t0)  # fmt: skip

    trainer = L.Trainer(
        callbacks=[_Log()], accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=False, default_root_dir=str(work),
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - t0
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(work / "finetuned", out_dir)
    return {"seconds": round(seconds, 1), "steps": steps, "batch_size": batch_size, "lr": lr,
            "train_images": len(train_rows), "val_loss": module.best_val,
            "name_schemes": {k: w for k, (w, _) in (schemes or {}).items()},
            "letters_fraction": letters_fraction}  # fmt: skip


# ------------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def lvlm_accuracy(model_dir: Path, images: np.ndarray, labels: np.ndarray, cands: list[list[int]],
                  class_names: list[str], options: str = "names", timing: dict | None = None) -> float:  # fmt: skip
    """Accuracy of the saved LLaVA choosing among ``cands`` (class ids, in the order shown, named by
    ``class_names``), loaded through the backend a user's config builds; ``options`` as the prompt's.
    ``timing``, when given, gets the wall seconds per image of the answers (loading excluded)."""
    from PIL import Image

    from cascadevlm.lvlm.base import LVLMRequest
    from cascadevlm.lvlm.transformers_backend import TransformersBackend

    prompt = dataclasses.replace(demo_prompt_config(), options=options)
    backend = TransformersBackend(model=str(model_dir), mode="score", device="cpu", batch_size=64,
                                  prompt=prompt).load()  # fmt: skip
    hits = 0
    t0 = time.perf_counter()
    for i in range(0, len(images), 64):
        reqs = [
            LVLMRequest(image=Image.fromarray(im), candidates=[class_names[c] for c in cs], key=str(i + j))
            for j, (im, cs) in enumerate(zip(images[i : i + 64], cands[i : i + 64], strict=True))
        ]
        for a, cs, y in zip(backend.choose(reqs), cands[i : i + 64], labels[i : i + 64], strict=True):
            hits += int(cs[a.choice] == y) if a.choice is not None else 0
    if timing is not None:
        timing["seconds_per_image"] = (time.perf_counter() - t0) / len(images)
    return hits / len(images)


def check_on_uncertain(model_dir: Path, images: np.ndarray, labels: np.ndarray, cands: list[list[int]],
                       class_names: list[str], clip_acc: float) -> dict:  # fmt: skip
    """The LLaVA on CLIP's most uncertain val images: names in three spellings (registry, official, upper
    case) and lettered options (registry names), CLIP's accuracy beside them, and seconds per image."""
    timing: dict = {}
    out = {"images": len(images), "clip_acc": clip_acc}
    for scheme in ("registry", "official", "upper"):
        t = timing if scheme == "registry" else None
        out[f"lvlm_acc_{scheme}"] = lvlm_accuracy(model_dir, images, labels, cands, spelling(class_names, scheme),
                                                  timing=t)  # fmt: skip
    out["lvlm_acc_letters"] = lvlm_accuracy(model_dir, images, labels, cands, class_names, options="letters")
    out["lvlm_acc"] = out["lvlm_acc_registry"]
    out["seconds_per_image"] = round(timing["seconds_per_image"], 5)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mark_llava(out_dir: Path, seed: int, size: str = "main") -> None:
    from cascadevlm.provenance import write_provenance

    v_layers, v_width, t_layers, t_width = LLAVA_SIZES[size]
    what = "a small LLaVA" if size == "main" else "the demo's cheaper, weaker second LLaVA"
    write_provenance(out_dir, {
        "kind": "trained-demo",
        "description": f"{what} ({v_layers}-layer CLIP vision tower, {v_width} wide + {t_layers}-layer Llama, "
        f"{t_width} wide, trained from scratch) fine-tuned here by cascadevlm.zoo.pretrain on Fashion-MNIST's "
        "train split (all 10 classes) to answer the cascade prompt, its candidates named in varied spellings; "
        "not a pretrained LVLM",
        "seed": seed,
    })  # fmt: skip


def _reused_clip_info(path: Path) -> dict:
    """``--clip-from``'s record: its own training record from the manifest beside it when that lists these
    bytes (the committed CLIP), else only where it came from."""
    info: dict = {"reused": str(path), "sha256": sha256(path)}
    beside = path.parent / "manifest.json"
    if beside.is_file():
        old = json.loads(beside.read_text())
        if old.get("files", {}).get(path.name) == info["sha256"]:
            info["trained_by"] = {"command": old.get("command"), **{k: v for k, v in old["clip"].items()
                                                                       if k not in ("model_name", "path")}}  # fmt: skip
    return info


# ------------------------------------------------------------------------------------------------ main
def pretrain(
    out: Path = DEFAULT_OUT, seed: int = 0, clip_steps: int = 400, clip_batch: int = 256, clip_lr: float = 2e-3,
    vision_steps: int = 250, vision_batch: int = 128, vision_lr: float = 2e-3,
    lvlm_steps: int = 800, lvlm_batch: int = 32, lvlm_lr: float = 1e-3,
    small_vision_steps: int = 150, small_lvlm_steps: int = 600, small_lvlm_lr: float = 2e-3,
    train_upper: bool = True, letters_fraction: float = LETTERS_FRACTION, train_limit: int | None = None,
    val_limit: int = 2000, data_root: str = "data", command: str | None = None, clip_from: Path | None = None,
    small: bool = True,
) -> dict:  # fmt: skip
    """Train CLIP and both LLaVAs into ``out`` and write ``manifest.json``; returns the manifest.
    ``clip_from``: reuse that CLIP checkpoint instead of training one (for iterating on the LLaVAs)."""
    from cascadevlm.clip.model import load_clip
    from cascadevlm.data.demo import fashion_mnist_dir
    from cascadevlm.data.loading import load_dataset_dict
    from cascadevlm.data.registry import FASHION_MNIST

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reused = _reused_clip_info(Path(clip_from)) if clip_from is not None else None
    (out / "manifest.json").unlink(missing_ok=True)  # the old one would refuse the new weights at the checks
    class_names = list(FASHION_MNIST.class_names)
    templates = list(FASHION_MNIST.templates)
    dataset_dir = str(fashion_mnist_dir(data_root))
    dsd = load_dataset_dict(dataset_dir)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    tr_img, tr_y = _split_arrays(dsd, "train", train_limit)
    va_img, va_y = _split_arrays(dsd, "val", val_limit)

    # 1. CLIP
    ref = load_clip(CLIP_MODEL)  # for its eval transform only: train on exactly what the stage will see
    tr_px = clip_pixels(tr_img, ref.preprocess)
    va_px = clip_pixels(va_img, ref.preprocess)
    clip_path = out / CLIP_FILE
    cpu0 = time.process_time()
    if clip_from is None:
        clip_info = train_clip(
            clip_path, tr_px, tr_y, class_names, templates, clip_steps, clip_batch, clip_lr, seed
        )
        clip_info["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    else:
        clip_info = reused
        if Path(clip_from).resolve() != clip_path.resolve():
            shutil.copyfile(clip_from, clip_path)
    bundle = load_clip(CLIP_MODEL, pretrained=str(clip_path))  # the user's route
    va_p = clip_probs(bundle, va_px, class_names, templates)
    left = np.isin(va_y, [class_names.index(n) for n in LEFT_OUT])
    va_hit = va_p.argmax(-1).numpy() == va_y
    clip_info["val_zero_shot_acc"] = {
        "all": float(va_hit.mean()), "seen": float(va_hit[~left].mean()), "left_out": float(va_hit[left].mean())
    }  # fmt: skip
    log.info("CLIP val zero-shot: %s", clip_info["val_zero_shot_acc"])

    # 2. the LLaVAs, with CLIP's candidates on half of the training images and names in varied spellings
    schemes = name_schemes(class_names, train_upper)
    ent = -(va_p * va_p.clamp_min(1e-12).log()).sum(-1).numpy()
    top = va_p.topk(NUM_CANDIDATES, -1).indices.tolist()
    unsure = np.argsort(-ent, kind="stable")[: max(1, int(0.3 * len(ent)))]
    clip_unsure = float(va_hit[unsure].mean())
    sizes = {"main": (LLAVA_DIR, vision_steps, lvlm_steps, lvlm_lr)}
    if small:
        sizes["small"] = (LLAVA_SMALL_DIR, small_vision_steps, small_lvlm_steps, small_lvlm_lr)
    lvlms = {}
    with tempfile.TemporaryDirectory(prefix="cascadevlm-pretrain-") as tmp:
        work = Path(tmp)
        tr_p = clip_probs(bundle, tr_px, class_names, templates)
        rng = np.random.default_rng(seed)
        rows = np.arange(len(tr_y))
        clip_rows = np.sort(rng.choice(rows, size=len(rows) // 2, replace=False))
        records = write_train_records(work / "train_records.parquet", tr_p, tr_y, clip_rows)
        for size, (name, v_steps, l_steps, l_lr) in sizes.items():
            cpu0 = time.process_time()
            init = build_llava_init(work / f"init_{size}", class_names, seed, size)
            vision_info = pretrain_vision_tower(init, tr_img, tr_y, v_steps, vision_batch, vision_lr, seed)
            llava_dir = out / name
            lvlm_info = train_llava(init, llava_dir, work / size, dataset_dir, rows.tolist(), records, l_steps,
                                    lvlm_batch, l_lr, seed, val_limit=256, schemes=schemes,
                                    letters_fraction=letters_fraction)  # fmt: skip
            _mark_llava(llava_dir, seed, size)
            v_layers, v_width, t_layers, t_width = LLAVA_SIZES[size]
            lvlms[size] = {
                "path": name, "finetune": "full", "prompt_options": "names",
                "size": {"vision_layers": v_layers, "vision_width": v_width, "llama_layers": t_layers,
                         "llama_width": t_width},
                "stage1_vision_tower": vision_info, "stage2_full_finetune": lvlm_info,
                "cpu_seconds": round(time.process_time() - cpu0, 1),
            }  # fmt: skip
            # 3. Check on val: the LVLM must beat CLIP on the images CLIP is least sure of, however named
            lvlms[size]["val_most_uncertain_30pct"] = check_on_uncertain(
                llava_dir, va_img[unsure], va_y[unsure], [top[i] for i in unsure], class_names, clip_unsure
            )
            log.info(
                "%s LLaVA, val, CLIP's 30%% most uncertain: %s", size, lvlms[size]["val_most_uncertain_30pct"]
            )

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "command": command or "python -m cascadevlm.zoo.pretrain",
        "data": {
            "dataset": "fashion_mnist",
            "train_split": "train (55000 images; official train minus val)",
            "check_split": f"val (first {len(va_y)} rows)",
            "test_split": "never read",
            "train_limit": train_limit,
        },  # fmt: skip
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "left_out_classes": list(LEFT_OUT),
        "clip": {"model_name": CLIP_MODEL, "path": CLIP_FILE, **clip_info},
        "lvlm": lvlms["main"],
        **({"lvlm_small": lvlms["small"]} if small else {}),
        "lvlm_training_names": {
            "schemes": {k: n for k, (_, n) in schemes.items()},
            "held_out": [] if train_upper else ["upper (FULL UPPER CASE)"],
            "letters_fraction": letters_fraction,
            "candidates": "CLIP's top-5 in CLIP's order on half of the train images, the true class among "
            "random distractors in random order on the other half",
        },
        "total_seconds": round(time.perf_counter() - t_all, 1),  # wall clock, on a CPU shared with others
        "total_cpu_seconds": round(time.process_time() - cpu_all, 1),
        "files": {str(p.relative_to(out)): sha256(p) for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cascadevlm.zoo.pretrain", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the checkpoints and manifest go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-steps", type=int, default=400)
    p.add_argument("--vision-steps", type=int, default=250, help="LLaVA stage 1 (vision tower) steps")
    p.add_argument("--lvlm-steps", type=int, default=800, help="LLaVA stage 2 (full fine-tuning) steps")
    p.add_argument("--small-vision-steps", type=int, default=150, help="small LLaVA stage 1 steps")
    p.add_argument("--small-lvlm-steps", type=int, default=600, help="small LLaVA stage 2 steps")
    p.add_argument("--no-small", action="store_true", help="train the main LLaVA only (iterating)")
    p.add_argument("--hold-out-upper", action="store_true",
                   help="leave FULL UPPER CASE names out of stage 2 (trained on by default)")  # fmt: skip
    p.add_argument("--letters-fraction", type=float, default=LETTERS_FRACTION,
                   help="share of stage-2 prompts with lettered options")  # fmt: skip
    p.add_argument("--clip-from", type=Path, default=None,
                   help="reuse this CLIP checkpoint instead of training one (iterating on the LLaVAs)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the same numbers on any machine)"
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N train images (tests)")
    p.add_argument("--val-limit", type=int, default=2000, help="val images for the manifest's accuracies")
    p.add_argument("--data-root", default="data", help="where the Fashion-MNIST splits are built")
    args = one_flag_style(p).parse_args(argv)  # --clip_steps as in train.py; --clip-steps still works
    if not 0.0 <= args.letters_fraction <= 1.0:
        p.error(f"--letters-fraction must be in [0, 1], got {args.letters_fraction}")
    if args.clip_from is not None and not args.clip_from.is_file():
        p.error(f"--clip-from {args.clip_from} is not a file (a CLIP checkpoint, e.g. {CLIP_CHECKPOINT})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    argv_ = sys.argv[1:] if argv is None else argv
    manifest = pretrain(
        args.out, args.seed, clip_steps=args.clip_steps, vision_steps=args.vision_steps, lvlm_steps=args.lvlm_steps,
        small_vision_steps=args.small_vision_steps, small_lvlm_steps=args.small_lvlm_steps,
        train_upper=not args.hold_out_upper, letters_fraction=args.letters_fraction, train_limit=args.train_limit,
        val_limit=args.val_limit, data_root=args.data_root, clip_from=args.clip_from, small=not args.no_small,
        command=shlex.join(["python", "-m", "cascadevlm.zoo.pretrain", *argv_]),
    )  # fmt: skip
    print(json.dumps({k: manifest.get(k) for k in ("clip", "lvlm", "lvlm_small", "total_seconds")}, indent=1))


if __name__ == "__main__":
    main()
