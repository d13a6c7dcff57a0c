"""LoRA (or full) fine-tuning of an LVLM on the k-shot split, formatted as cascade prompts.

Each training example is a cascade prompt (image + candidate classes as options) and the target is the
true class's answer (its letter or name, then the chat template's end of turn); the loss covers the
answer tokens only. Candidates come from CLIP's top-k in a records file when one is given (the true
class put in at a random position when CLIP missed it), else the true class plus deterministic random
distractors, shuffled. The adapter is saved in peft's format (best validation loss when a validation
split is given, else the last) and loaded by ``TransformersBackend(lora_path=...)``. With
``finetune: full`` every weight is trained and the whole model directory (weights, config, processor)
is saved with ``save_pretrained`` instead, loaded as ``TransformersBackend(model=<that directory>)``.

Used through ``train.py`` (``LightningCLI``)::

    model: {class_path: cascadevlm.lvlm.lora.LoRAModule, init_args: {model: ..., r: 8}}
    data: {class_path: cascadevlm.lvlm.lora.LoRADataModule, init_args: {dataset: ..., kshot_path: ...}}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torchmetrics

from cascadevlm.data.kshot import KShotSplit, dataset_kshot_split, kshot_dataset_name
from cascadevlm.data.loading import IMAGE_COLUMN, LABEL_COLUMN, decode_image, load_dataset_dict
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt
from cascadevlm.lvlm.scoring import answer_loss, append_answers, forward_inputs, score_candidates
from cascadevlm.lvlm.transformers_backend import (
    ChatEncoder,
    check_model_path,
    load_model_and_processor,
    resolve_device,
    resolve_dtype,
)

# Attention and MLP projections of the language model only: ``language_model`` in LLaVA and Qwen2-VL,
# ``text_model`` in Idefics3 / SmolVLM (whose vision tower's ``vision_model`` projections stay frozen).
DEFAULT_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def training_candidates(
    label: int, num_classes: int, k: int, seed: int, row: int, clip_topk: list[int] | None = None
) -> tuple[list[int], int]:
    """Candidate class ids for one training image and the true class's position among them.

    With ``clip_topk`` the candidates are CLIP's top-k in CLIP's order; when the true class is missing
    it replaces one of them at a random position. Without, the true class and ``k - 1`` random
    distractors are shuffled. Deterministic in ``(seed, row)``.
    """
    k = min(k, num_classes)
    rng = np.random.default_rng([seed, row])
    if clip_topk:
        cands = [int(c) for c in clip_topk[:k]]
        if label not in cands:
            cands[int(rng.integers(len(cands)))] = label
        return cands, cands.index(label)
    others = [c for c in range(num_classes) if c != label]
    cands = [label, *(int(c) for c in rng.choice(others, size=k - 1, replace=False))]
    rng.shuffle(cands)
    return cands, cands.index(label)


class CascadePromptDataset(torch.utils.data.Dataset):
    """Rows as ``{"index", "image", "candidates" (names), "target" (position)}``, plus ``"options"``
    (``letters`` or ``names``) when ``letters_fraction`` is set.

    Args:
        name_variants: naming schemes, each a list of names by class id (e.g. official spellings, upper
            case, synonyms); each prompt draws ONE scheme (every candidate of that prompt in it),
            deterministically in ``(seed, row)``. None (default): ``class_names`` everywhere.
        name_weights: the schemes' draw probabilities (uniform when None).
        letters_fraction: share of prompts shown with lettered options and answered by letter (the
            rest by name, the module's prompt wording otherwise). 0 (default): no ``"options"`` key.
    """

    def __init__(
        self,
        ds,
        rows: list[int],
        class_names: list[str],
        k: int,
        seed: int,
        topk: dict[int, list[int]],
        name_variants: list[list[str]] | None = None,
        name_weights: list[float] | None = None,
        letters_fraction: float = 0.0,
    ):
        self.ds = ds
        self.rows = rows
        self.class_names = class_names
        self.k = k
        self.seed = seed
        self.topk = topk
        self.name_variants = [list(v) for v in name_variants] if name_variants else None
        for v in self.name_variants or []:
            if len(v) != len(class_names):
                raise ValueError(
                    f"a name variant has {len(v)} names for {len(class_names)} classes: {v!r} "
                    "(--data.init_args.name_variants)"
                )
        if name_weights is not None and (
            not self.name_variants
            or len(name_weights) != len(self.name_variants)
            or min(name_weights) < 0
            or sum(name_weights) <= 0
        ):
            raise ValueError(
                f"name_weights {name_weights!r} must be one non-negative weight per name variant, not all 0 "
                "(--data.init_args.name_weights)"
            )
        self.name_p = None if name_weights is None else np.asarray(name_weights, float) / sum(name_weights)
        if not 0.0 <= letters_fraction <= 1.0:
            raise ValueError(
                f"letters_fraction must be in [0, 1], got {letters_fraction} (--data.init_args.letters_fraction)"
            )
        self.letters_fraction = letters_fraction

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        item = self.ds[row]
        label = int(item[LABEL_COLUMN])
        ids, target = training_candidates(
            label, len(self.class_names), self.k, self.seed, row, self.topk.get(row)
        )
        names = self.class_names
        # a stream of its own, so the candidates stay those drawn without the options below
        rng = np.random.default_rng([self.seed, row, 1])
        if self.name_variants:
            names = self.name_variants[int(rng.choice(len(self.name_variants), p=self.name_p))]
        out = {
            "index": row,
            "image": decode_image(item[IMAGE_COLUMN], f"row {row}"),
            "candidates": [names[c] for c in ids],
            "target": target,
        }
        if self.letters_fraction > 0:
            out["options"] = "letters" if rng.random() < self.letters_fraction else "names"
        return out


def collate_prompts(items: list[dict]) -> dict:
    """Keep images and names as lists: the LightningModule's processor encodes them."""
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "image": [it["image"] for it in items],
        "candidates": [it["candidates"] for it in items],
        "target": torch.tensor([it["target"] for it in items]),
    } | ({"options": [it["options"] for it in items]} if "options" in items[0] else {})


class LoRADataModule(L.LightningDataModule):
    """The k-shot split as cascade prompts for LoRA.

    Args:
        dataset: a dataset directory (``save_to_disk`` or image folder), a hub name, or ``fashion_mnist``
            (the offline demo data, built under ``data_root`` on first use).
        kshot_path: a k-shot split file (indices into ``train_split``); when None the (dataset, shots,
            seed) split under ``splits_dir`` is used, written on first use (the one CLIP adapters use).
        train_split: the split the k-shot indices point into.
        val_split: an optional validation split (its first ``val_limit`` rows); the best adapter by
            validation loss is kept when given.
        num_candidates: options per prompt (CLIP's top-k at evaluation).
        records_path: prediction records of CLIP over ``train_split`` (their ``clip_topk`` become the
            candidates); random distractors when None.
        class_names: override the dataset's class names.
        name_variants, name_weights, letters_fraction: training-prompt augmentation (see
            :class:`CascadePromptDataset`); validation prompts keep ``class_names`` and the module's options.
        batch_size, num_workers: data loading; ``seed`` picks the k-shot draw and the distractors.
    """

    def __init__(
        self,
        dataset: str,
        kshot_path: str | None = None,
        shots: int = 4,
        seed: int = 1,
        splits_dir: str = "artifacts/splits",
        data_root: str = "data",
        train_split: str = "train",
        val_split: str | None = None,
        val_limit: int | None = 64,
        num_candidates: int = 5,
        records_path: str | None = None,
        class_names: list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        name_variants: list[list[str]] | None = None,
        name_weights: list[float] | None = None,
        letters_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.train_split = train_split
        self.val_split = val_split
        self.val_limit = val_limit
        self.num_candidates = num_candidates
        self.records_path = records_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.name_variants, self.name_weights = name_variants, name_weights
        self.letters_fraction = letters_fraction
        if dataset == "fashion_mnist":
            from cascadevlm.data.demo import fashion_mnist_dir

            self.dsd = load_dataset_dict(str(fashion_mnist_dir(data_root)))
        else:
            self.dsd = load_dataset_dict(dataset)
        for s in [train_split, val_split]:
            if s is not None and s not in self.dsd:
                raise ValueError(f"dataset {dataset!r} has no split {s!r}; it has {list(self.dsd)}")
        self.class_names = list(class_names or self.dsd[train_split].features[LABEL_COLUMN].names)
        # The same split file (name, draw, fingerprint check) as the CLIP adapters of (dataset, k, seed).
        self.name = kshot_dataset_name(dataset, self.dsd[train_split])
        if kshot_path is not None:
            self.split = KShotSplit.load(kshot_path)
        else:
            self.split = dataset_kshot_split(
                splits_dir, dataset, self.dsd[train_split], shots, seed, len(self.class_names)
            )

    def run_name(self, method: str) -> tuple[str, str]:
        """(experiment, version) for the run directory: ``<dataset>_<method>``, ``k<shots>_seed<seed>``."""
        return f"{self.name}_{method}", f"k{self.split.k}_seed{self.split.seed}"

    def _topk(self) -> dict[int, list[int]]:
        if not self.records_path:
            return {}
        from cascadevlm.records import read_records

        return {r.index: list(r.clip_topk) for r in read_records(self.records_path)}

    def setup(self, stage: str | None = None) -> None:
        topk = self._topk()
        self.train_set = CascadePromptDataset(
            self.dsd[self.train_split],
            self.split.all_indices,
            self.class_names,
            self.num_candidates,
            self.seed,
            topk,
            self.name_variants,
            self.name_weights,
            self.letters_fraction,
        )
        self.val_set = None
        if self.val_split:
            n = len(self.dsd[self.val_split])
            rows = list(range(n if self.val_limit is None else min(n, self.val_limit)))
            self.val_set = CascadePromptDataset(
                self.dsd[self.val_split], rows, self.class_names, self.num_candidates, self.seed + 1, {}
            )

    def _loader(self, ds, shuffle: bool):
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


class LoRAModule(L.LightningModule):
    """An LVLM with a peft LoRA adapter (or all weights), trained to answer cascade prompts with the true class.

    Args:
        model: base model directory or hub id (``AutoModelForImageTextToText``).
        prompt: the prompt wording used at evaluation (train as you test).
        finetune: ``lora`` (a peft adapter on ``target_modules``) or ``full`` (every weight, vision tower
            included; for small LVLMs); ``r``, ``alpha``, ``dropout``, ``target_modules`` are LoRA's only.
        r, alpha, dropout: LoRA rank, scaling and dropout.
        target_modules: a regex or module-name list for peft (default: language-model projections).
        lr, weight_decay: AdamW settings.
        adapter_dir: where the adapter is saved (default: ``<log dir>/lora_adapter``); with ``full``, where
            the model directory is saved (default: ``<log dir>/finetuned_model``).
        dtype: weights' dtype (``auto``: bfloat16 on GPUs that support it, else float32).
        gradient_checkpointing: trade compute for memory on large models.
    """

    method = "lvlm_lora"

    def __init__(
        self,
        model: str,
        prompt: PromptConfig | None = None,
        finetune: Literal["lora", "full"] = "lora",
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: str | list[str] = DEFAULT_TARGETS,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adapter_dir: str | None = None,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from peft import LoraConfig, get_peft_model

        if finetune not in ("lora", "full"):
            raise ValueError(
                f"finetune must be 'lora' or 'full', got {finetune!r} (--model.init_args.finetune)"
            )
        self.finetune = finetune
        check_model_path(model, "model.init_args.model")

        self.prompt = prompt or PromptConfig()
        # dtype auto: bfloat16 when training will run on a bf16 GPU, created so on the CPU (no float32
        # copy: 14 GB, not 28 GB, for a 7B); Lightning then moves it to each rank's device.
        train_dtype = resolve_dtype(dtype, resolve_device("auto"))
        base, processor = load_model_and_processor(model, dtype=train_dtype, device="cpu")
        if gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        if finetune == "full":
            base.requires_grad_(True)
            self.net = base.train()  # from_pretrained returns eval mode
        else:
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
            self.net = get_peft_model(base, config).train()
        self.processor = processor
        self.encoder = ChatEncoder(processor)
        self.adapter_dir = adapter_dir
        self.best_val: float | None = None
        self.val_losses: list[float] = []  # one per validation epoch
        self.val_loss = torchmetrics.MeanMetric()
        self.val_acc = torchmetrics.MeanMetric()

    # ------------------------------------------------------------------------------------------ forward
    def _prompts(self, batch: dict):
        reqs = [
            LVLMRequest(image=im, candidates=c, key=str(int(i)))
            for im, c, i in zip(batch["image"], batch["candidates"], batch["index"], strict=True)
        ]
        if "options" not in batch:  # one wording for the batch
            return [build_prompt(r, self.prompt) for r in reqs]
        configs = {o: dataclasses.replace(self.prompt, options=o) for o in set(batch["options"])}
        return [build_prompt(r, configs[o]) for r, o in zip(reqs, batch["options"], strict=True)]

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy of the true answers' tokens."""
        prompts = self._prompts(batch)
        inputs = self.encoder.encode(prompts, self.device)
        answers = [
            self.encoder.answer_ids(p.answers[p.display_of(int(t))])
            for p, t in zip(prompts, batch["target"], strict=True)
        ]
        full, labels = append_answers(inputs, answers, self.encoder.pad_id)
        logits = self.net(**forward_inputs(self.net, full)).logits
        return answer_loss(logits, labels)

    def scores(self, batch: dict) -> list[list[float]]:
        """Candidate log-likelihoods (in each row's candidate order), as the backend computes them."""
        prompts = self._prompts(batch)
        inputs = self.encoder.encode(prompts, self.device)
        ids = [[self.encoder.answer_ids(a) for a in p.answers] for p in prompts]
        shown = score_candidates(self.net, inputs, ids, self.encoder.pad_id)
        return [[s[p.display_of(c)] for c in range(len(s))] for p, s in zip(prompts, shown, strict=True)]

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = len(batch["target"])
        loss = self.loss(batch)
        self.val_loss.update(loss, weight=n)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=n)
        scores = self.scores(batch)
        hits = torch.tensor(
            [float(np.argmax(s) == int(t)) for s, t in zip(scores, batch["target"], strict=True)],
            device=self.device,
        )
        self.val_acc.update(hits)
        self.log("val/acc", self.val_acc, batch_size=n)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------------------------------ saving
    def resolved_adapter_dir(self) -> Path:
        if self.adapter_dir:
            return Path(self.adapter_dir)
        trainer = getattr(self, "_trainer", None)
        root = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
        return Path(root) / ("finetuned_model" if self.finetune == "full" else "lora_adapter")

    def save_adapter(self, path: str | Path | None = None) -> Path:
        """Write the adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``), or
        with ``finetune: full`` the whole model directory (weights, config, processor and chat template)."""
        path = Path(path) if path is not None else self.resolved_adapter_dir()
        self.net.save_pretrained(str(path))
        if self.finetune == "full":
            self.processor.save_pretrained(str(path))
        return path

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.val_loss.update_count == 0:
            return
        val = float(self.val_loss.compute())  # synced over ranks
        self.val_losses.append(val)
        if self.best_val is None or val < self.best_val:
            self.best_val = val
            if self.trainer.is_global_zero:
                self.save_adapter()

    def on_fit_end(self) -> None:
        if self.best_val is None and self.trainer.is_global_zero:  # no validation: keep the last
            self.save_adapter()
