"""Local Hugging Face LVLMs: any model ``AutoModelForImageTextToText`` + ``AutoProcessor`` load with a chat
template (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...), optionally with a peft LoRA adapter.

Two answer modes:

* ``score``: the log-likelihood of each option's answer (its letter or name, then the chat template's
  end-of-turn) after the prompt; every option of a batch in one shared-prompt forward (see
  :mod:`cascadevlm.lvlm.scoring`). The highest score wins; nothing is parsed.
* ``generate``: greedy generation, then :func:`cascadevlm.lvlm.parsing.parse_answer`; an unparseable
  answer falls back to the request's fallback (CLIP's top-1) and says so.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.lvlm.folders import check_lora_folder, check_model_folder
from cascadevlm.lvlm.parsing import UNPARSEABLE, parse_answer
from cascadevlm.lvlm.prompts import SHORT_ANSWER_TOKENS, Prompt, PromptConfig, answer_tokens, build_prompt
from cascadevlm.lvlm.scoring import forward_inputs, score_candidates

# set while from_model builds a backend around a model in memory (its name is no path to check)
_IN_MEMORY: contextvars.ContextVar[bool] = contextvars.ContextVar("in_memory_model", default=False)

_SENTINEL = "\u2063ANSWER\u2063"
log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, float32 otherwise; or a torch dtype (name)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; expected auto, float32, bfloat16 or float16")
    return value


def load_model_and_processor(
    model: str,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    lora_path: str | None = None,
    merge_lora: bool = True,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """The model (eval mode, with the LoRA adapter if given) and its processor.

    The weights are created directly in ``dtype`` on ``device`` (no float32 copy first), or spread over
    the visible GPUs by ``device_map`` (``auto``, ``balanced``, ... as accelerate reads it) for models
    larger than one GPU. ``min_pixels`` / ``max_pixels`` bound the image area of dynamic-resolution
    processors (Qwen2-VL, Qwen2.5-VL): the image-token count, and so memory, grows with it.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dev = resolve_device("auto" if device_map is not None else device)
    kwargs = {"dtype": resolve_dtype(dtype, dev), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif dev.type != "cpu":
        kwargs["device_map"] = str(dev)  # load straight onto the device
    from cascadevlm.provenance import check_manifest

    check_manifest(model, "--lvlm.init_args.model")  # the demo's own weights: as in their manifest
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    set_pixel_limits(processor, min_pixels, max_pixels)  # refused before the weights load
    net = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    if lora_path:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, lora_path)
        if merge_lora:
            net = net.merge_and_unload()
    if getattr(processor, "chat_template", None) is None and getattr(
        processor.tokenizer, "chat_template", None
    ):
        processor.chat_template = processor.tokenizer.chat_template
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"model {model!r} has no chat template; the LVLM stage needs one to build prompts")
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if device_map is None:
        net = net.to(dev)
    return net.eval(), processor


def set_pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound a dynamic-resolution image processor's image area (pixels); refuse other processors."""
    if min_pixels is None and max_pixels is None:
        return
    image = getattr(processor, "image_processor", None)
    size = getattr(image, "size", None)
    if image is None or getattr(image, "merge_size", None) is None or size is None:
        raise ValueError(
            f"min_pixels / max_pixels need a dynamic-resolution image processor (Qwen2-VL, Qwen2.5-VL); "
            f"{type(image).__name__} resizes to a fixed size: remove min_pixels / max_pixels"
        )
    lo = min_pixels if min_pixels is not None else size["shortest_edge"]
    hi = max_pixels if max_pixels is not None else size["longest_edge"]
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={lo}, max_pixels={hi}")
    image.size = {"shortest_edge": lo, "longest_edge": hi}


def image_token_count(processor, image) -> int:
    """How many image tokens the processor gives ``image`` (they dominate a prompt's length and memory)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    token = getattr(processor, "image_token", None) or "<image>"
    return int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def check_model_path(model: str, option: str) -> None:
    """Refuse, in one line, a ``model`` that names a local directory which does not exist.

    A name reads as a local path when it starts with ``/``, ``.`` or ``~``, has more than one ``/``, or
    its first folder exists here; ``org/name`` is left to transformers as a hub id.
    """
    from pathlib import Path

    path = Path(model).expanduser()
    looks_local = (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"LVLM model directory {model!r} does not exist; set {option} to a model directory or a Hugging "
            "Face hub id (org/name)"
        )


class ChatEncoder:
    """Renders cascade prompts with a processor's chat template and tokenizes answers as the model sees them.

    Special tokens follow transformers' own ``processor.apply_chat_template(..., tokenize=True)``: the
    tokenizer adds its special tokens (e.g. LLaVA-1.5's BOS, which its template leaves out) unless the
    rendered prompt already starts with BOS (Idefics3, SmolVLM), so the ids equal the processor's.

    An answer is scored with what follows it in the template (``" "`` before, ``"<|im_end|>"`` after
    for ChatML, ``"<end_of_utterance>"`` for Idefics3) read off the template once; a template that ends
    the assistant turn with no special token (LLaVA-1.5) gets the tokenizer's end of sequence, which the
    model emits to stop, so a name that is a prefix of another ("Boeing 737" / "Boeing 737-800") can
    lose. Answers are tokenized after the generation prompt's tail, so a word-initial answer gets the
    tokens it has in context (SentencePiece's ``"▁B"``), not those of a string on its own.
    """

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        prompt = self.render(probe)
        full = processor.apply_chat_template(
            [*probe, {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], tokenize=False
        )
        if full.startswith(prompt) and _SENTINEL in full:
            before, after = full[len(prompt) :].split(_SENTINEL, 1)
            self.answer_prefix, self.answer_suffix = before, after.rstrip()
        else:  # templates that rewrite earlier turns: the answer alone, then end of sequence
            self.answer_prefix, self.answer_suffix = "", ""
        if not self._has_special(self.answer_suffix) and self.tokenizer.eos_token:
            # No end-of-turn token: the model ends its reply with end of sequence (LLaVA-1.5's "</s>").
            self.answer_suffix += self.tokenizer.eos_token
        self._context = prompt  # answers are tokenized after this text (see answer_ids)
        self._answer_cache: dict[str, list[int]] = {}

    def _has_special(self, text: str) -> bool:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special
        }
        return any(i in special for i in ids)

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def add_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer adds its special tokens to a rendered prompt: as transformers'
        ``apply_chat_template(tokenize=True)`` decides, not when the template already wrote BOS."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the reply ``answer`` (with the template's surroundings) after a generation prompt."""
        if answer not in self._answer_cache:
            text = f"{self.answer_prefix}{answer}{self.answer_suffix}"
            tok = self.tokenizer
            context = tok(self._context, add_special_tokens=False)["input_ids"]
            joined = tok(self._context + text, add_special_tokens=False)["input_ids"]
            if joined[: len(context)] == context:
                ids = joined[len(context) :]
            else:  # the answer merged with the prompt's last token: tokenize it on its own
                ids = tok(text, add_special_tokens=False)["input_ids"]
            self._answer_cache[answer] = ids
        return list(self._answer_cache[answer])

    def encode(self, prompts: list[Prompt], device: torch.device | None = None):
        """Processor outputs for a batch of prompts, left-padded, images in order of appearance.

        Images go as one list per prompt: processors that match images to prompts (Gemma 3, Idefics3)
        refuse one flat list for a batch, and the others flatten the nesting themselves."""
        texts = [self.render(p.messages) for p in prompts]
        images = [list(p.images) for p in prompts]
        inputs = self.processor(
            text=texts,
            images=images,
            padding=True,
            return_tensors="pt",
            add_special_tokens=self.add_special_tokens(texts[0]),
        )
        return inputs.to(device) if device is not None else inputs

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


@dataclass
class PreparedBatch:
    """A batch preprocessed for the model (what :class:`BatchPreparer` returns, e.g. in DataLoader
    workers): the requests, their prompts without images, the processor outputs and the answers' ids."""

    requests: list[LVLMRequest]
    prompts: list[Prompt]
    inputs: Mapping[str, torch.Tensor]
    answer_ids: list[list[list[int]]] | None  # score mode only

    def __len__(self) -> int:
        return len(self.requests)

    # Sent back from a DataLoader worker, the requests' images (kept for a re-run at a smaller batch
    # size after an out-of-memory) travel as uint8 tensors, which torch passes through shared memory:
    # pickled PIL images cost the main process 4-13 ms per image to unpickle, as much as a tiny model's
    # forward. They become PIL images again only when needed (:meth:`original_requests`).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["requests"], state["_images"] = _pack_images(self.original_requests())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def original_requests(self) -> list[LVLMRequest]:
        """The requests with their images (as PIL images, also after a trip between processes)."""
        packed = self.__dict__.get("_images")
        return self.requests if packed is None else _unpack_images(self.requests, packed)


_PACKABLE = ("RGB", "L", "RGBA")  # modes a uint8 array gives back exactly


def _pack_images(requests: list[LVLMRequest]) -> tuple[list[LVLMRequest], dict]:
    """The requests without their images, and the images' pixels in one flat uint8 tensor (one
    shared-memory handle per batch, not one per image) with each image's mode and shape."""
    import numpy as np

    arrays, index = [], []  # index[i]: (request, example or -1, mode, shape)

    def take(image, where: tuple[int, int]):
        if getattr(image, "mode", None) not in _PACKABLE:
            return image  # anything else pickles as it is
        array = np.asarray(image)
        arrays.append(array.reshape(-1))
        index.append((*where, image.mode, array.shape))
        return None

    light = []
    for i, r in enumerate(requests):
        examples = [dataclasses.replace(e, image=take(e.image, (i, j))) for j, e in enumerate(r.examples)]
        light.append(dataclasses.replace(r, image=take(r.image, (i, -1)), examples=examples))
    pixels = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, dtype=torch.uint8)
    return light, {"pixels": pixels, "index": index}


def _unpack_images(requests: list[LVLMRequest], packed: dict) -> list[LVLMRequest]:
    from PIL import Image

    flat = packed["pixels"].numpy()
    images, start = {}, 0
    for i, j, mode, shape in packed["index"]:
        size = math.prod(shape)
        images[(i, j)] = Image.fromarray(flat[start : start + size].reshape(shape), mode)
        start += size
    out = []
    for i, r in enumerate(requests):
        examples = [
            dataclasses.replace(e, image=images.get((i, j), e.image)) for j, e in enumerate(r.examples)
        ]
        out.append(dataclasses.replace(r, image=images.get((i, -1), r.image), examples=examples))
    return out


class BatchPreparer:
    """Renders prompts and runs the processor for a list of requests: the CPU side of a batch.

    Holds the processor and the prompt settings, never the model, so a DataLoader can run it in its
    workers (``collate_fn``) while the model computes the previous batch. ``batch_size``: the backend's
    requests per forward; callers that prepare more requests at once split them into batches of that
    size (:meth:`split`), as :meth:`TransformersBackend.choose` does, so the answers are the same.
    """

    def __init__(
        self, encoder: ChatEncoder, prompt: PromptConfig, mode: str, batch_size: int | None = None
    ) -> None:
        self.encoder = encoder
        self.prompt = prompt
        self.mode = mode
        self.batch_size = batch_size

    def split(self, requests: list[LVLMRequest]) -> list[PreparedBatch]:
        """``requests`` prepared in batches of :attr:`batch_size` (one per forward)."""
        n = self.batch_size or max(len(requests), 1)
        return [self(requests[i : i + n]) for i in range(0, len(requests), n)]

    def __call__(self, requests: list[LVLMRequest]) -> PreparedBatch:
        prompts = [build_prompt(r, self.prompt) for r in requests]
        inputs = self.encoder.encode(prompts)
        ids = None
        if self.mode == "score":
            ids = [[self.encoder.answer_ids(a) for a in p.answers] for p in prompts]
        light = [dataclasses.replace(p, messages=[], images=[], examples=[]) for p in prompts]
        return PreparedBatch(list(requests), light, inputs, ids)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class TransformersBackend(LVLMBackend):
    """A local LVLM choosing among candidates.

    Args:
        model: a model directory or hub id loadable with ``AutoModelForImageTextToText``.
        mode: ``score`` (candidate log-likelihoods) or ``generate`` (generate, then parse).
        prompt: prompt wording and options (see :class:`PromptConfig`).
        dtype: ``auto`` (bfloat16 on GPUs that have it, else float32), ``float32``, ``bfloat16``, ...
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        device_map: spread the model over several GPUs (``auto``, ``balanced``, or a module -> device
            dict), for models larger than one GPU; ``device`` is then ignored.
        batch_size: requests per forward. A batch that does not fit in device memory is halved (said
            once) and the run goes on with the smaller size; answers are those of the smaller batches.
        max_new_tokens: generation length in ``generate`` mode; unset: 16, or 512 with
            ``prompt.reasoning`` (an explanation, then ``Answer: X``; refused below 64).
        length_norm: in ``score`` mode, rank by mean instead of summed log-probability per token
            (fairer between names of different lengths).
        lora_path: a peft LoRA adapter directory to apply on top of ``model``.
        merge_lora: merge the adapter into the weights after loading (faster inference).
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2``, ...
        min_pixels / max_pixels: image area bounds for dynamic-resolution processors (Qwen2-VL,
            Qwen2.5-VL; refused for others). Image tokens = pixels / (14 * 14 * 4): the real processor's
            default maximum (12845056 pixels) allows 16384 tokens per image, so set ``max_pixels`` (e.g.
            ``448 * 448`` = 256 tokens) to bound memory.
        trust_remote_code: passed to ``from_pretrained``.
    """

    def __init__(
        self,
        model: str,
        mode: Literal["score", "generate"] = "score",
        prompt: PromptConfig | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        length_norm: bool = False,
        lora_path: str | None = None,
        merge_lora: bool = True,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        device_map: str | dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if mode not in ("score", "generate"):
            raise ValueError(f"mode must be 'score' or 'generate', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and value < 1:  # refused here, not when the model loads after the CLIP stage
                raise ValueError(f"lvlm.init_args.{name} must be >= 1 or null, got {value}")
        if not _IN_MEMORY.get():  # from_model names a model already in memory, not a path
            check_model_path(model, "lvlm.init_args.model")  # refused here too, not after the CLIP stage
            if Path(model).expanduser().is_dir():
                check_model_folder(model, "lvlm.init_args.model")
            if lora_path:
                check_lora_folder(lora_path, model, "lvlm.init_args.lora_path")
        self.model_name = model
        self.mode = mode
        self.prompt = prompt or PromptConfig()
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = answer_tokens(
            self.prompt, mode, max_new_tokens, "lvlm.init_args.max_new_tokens", SHORT_ANSWER_TOKENS
        )
        self._init_config["max_new_tokens"] = self.max_new_tokens  # the length used, in the fingerprint
        self.length_norm = length_norm
        self.lora_path = lora_path
        self.merge_lora = merge_lora
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.device_map = device_map
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self._net = None
        self._encoder: ChatEncoder | None = None
        self._calls = 0
        self._fit = batch_size  # the largest batch known to fit (halved on out-of-memory)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_model(cls, net: torch.nn.Module, processor, **kwargs) -> TransformersBackend:
        """A backend around a model and processor already in memory (benchmarks, notebooks)."""
        token = _IN_MEMORY.set(True)
        try:
            backend = cls(model=kwargs.pop("model", type(net).__name__), **kwargs)
        finally:
            _IN_MEMORY.reset(token)
        if kwargs.get("min_pixels") is not None or kwargs.get("max_pixels") is not None:
            set_pixel_limits(processor, kwargs.get("min_pixels"), kwargs.get("max_pixels"))
        processor.tokenizer.padding_side = "left"
        backend._net, backend._encoder = net.eval(), ChatEncoder(processor)
        return backend

    def load(self) -> TransformersBackend:
        """Load the model now (otherwise it loads on the first :meth:`choose`)."""
        if self._net is None:
            self._net, processor = load_model_and_processor(
                self.model_name,
                dtype=self.dtype,
                device=self.device,
                lora_path=self.lora_path,
                merge_lora=self.merge_lora,
                attn_implementation=self.attn_implementation,
                trust_remote_code=self.trust_remote_code,
                device_map=self.device_map,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
            self._encoder = ChatEncoder(processor)
        return self

    @property
    def net(self) -> torch.nn.Module:
        return self.load()._net

    @property
    def encoder(self) -> ChatEncoder:
        return self.load()._encoder

    @property
    def torch_device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first one under a device_map)."""
        return self.net.get_input_embeddings().weight.device

    @property
    def context_window(self) -> int | None:
        config = self.net.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    @property
    def prepare(self) -> BatchPreparer:
        """The CPU side of a batch as a picklable callable (no model inside): ``prepare(requests)``
        gives a :class:`PreparedBatch` that :meth:`choose` takes in place of the requests. Use it as a
        DataLoader's ``collate_fn`` so workers render prompts and process images ahead of the model."""
        return BatchPreparer(self.encoder, self.prompt, self.mode, self._fit)

    @property
    def fitted_batch_size(self) -> int:
        """The batch size in use: ``batch_size``, or less after an out-of-memory fallback."""
        return self._fit

    # ------------------------------------------------------------------------------------------ choosing
    def choose(self, requests: list[LVLMRequest] | PreparedBatch) -> list[LVLMAnswer]:
        """Answers for ``requests`` (or a batch :attr:`prepare` made), ``batch_size`` at a time."""
        if isinstance(requests, PreparedBatch) and len(requests) <= self._fit:
            return self._answer(requests)
        reqs = requests.original_requests() if isinstance(requests, PreparedBatch) else list(requests)
        answers: list[LVLMAnswer] = []
        while len(answers) < len(reqs):
            chunk = reqs[len(answers) : len(answers) + self._fit]
            answers += self._answer(self.prepare(chunk))
        return answers

    def score(self, requests: list[LVLMRequest]) -> list[list[float]]:
        """Per-candidate log-likelihoods (in each request's candidate order), whatever ``mode`` is."""
        out = []
        preparer = BatchPreparer(self.encoder, self.prompt, "score")
        for start in range(0, len(requests), self._fit):
            out += [a.scores for a in self._score(preparer(requests[start : start + self._fit]))]
        return out

    def _answer(self, batch: PreparedBatch) -> list[LVLMAnswer]:
        """One batch; on out-of-memory, halve the batch size (said once per halving) and redo it."""
        self.check_context(batch)
        try:
            answers = self._score(batch) if self.mode == "score" else self._generate(batch)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            if len(batch) == 1:
                raise RuntimeError(
                    f"one request does not fit in {self.torch_device} memory with {self.model_name!r}; "
                    "lower max_pixels or prompt.max_images, use dtype bfloat16, or device_map: auto"
                ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._fit = max(1, min(self._fit, len(batch)) // 2)
            log.warning(
                "LVLM batch of %d did not fit in %s memory; going on with batches of %d",
                len(batch),
                self.torch_device,
                self._fit,
            )
            return self.choose(batch.original_requests())
        self._calls += len(batch)
        return answers

    def check_context(self, batch: PreparedBatch) -> None:
        """Refuse a prompt (plus its longest answer) longer than the model's context window."""
        window = self.context_window
        if not window:
            return
        length = batch.inputs["input_ids"].shape[1]
        extra = (
            self.max_new_tokens
            if self.mode == "generate"
            else max(len(a) for row in batch.answer_ids for a in row)
        )
        if length + extra > window:
            raise ValueError(
                f"a prompt of {length} tokens (+{extra} answer tokens) exceeds {self.model_name!r}'s context "
                f"window of {window}; lower prompt.max_images (now {self.prompt.max_images}) or max_pixels "
                f"(now {self.max_pixels}), or pass fewer candidates"
            )

    def _score(self, batch: PreparedBatch) -> list[LVLMAnswer]:
        inputs = batch.inputs.to(self.torch_device)
        shown = score_candidates(
            self.net, inputs, batch.answer_ids, self.encoder.pad_id, length_norm=self.length_norm
        )
        out = []
        for p, s in zip(batch.prompts, shown, strict=True):
            scores = [0.0] * len(s)
            for d, value in enumerate(s):
                scores[p.candidate_of(d)] = value
            best = max(range(len(scores)), key=scores.__getitem__)
            out.append(LVLMAnswer(choice=best, raw="", scores=scores))
        return out

    @torch.inference_mode()
    def _generate(self, batch: PreparedBatch) -> list[LVLMAnswer]:
        enc = self.encoder
        inputs = batch.inputs.to(self.torch_device)
        kwargs = forward_inputs(self.net, inputs)
        kwargs.pop("position_ids", None)  # generate derives positions from the attention mask itself
        generated = self.net.generate(
            **kwargs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=enc.pad_id,
        )
        texts = enc.tokenizer.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        out = []
        for req, p, text in zip(batch.requests, batch.prompts, texts, strict=True):
            shown = parse_answer(text, p.options, p.style)
            if shown is None:
                out.append(LVLMAnswer(choice=req.fallback, raw=text, fallback=UNPARSEABLE))
            else:
                out.append(LVLMAnswer(choice=p.candidate_of(shown), raw=text))
        return out
