"""Realistic prediction records for routing tests and benchmarks, built offline in seconds.

CLIP: the tiny open_clip ViT (random weights) encodes real Fashion-MNIST photos; a linear probe
trained on its features of other Fashion-MNIST images gives the logits (an adapter-style CLIP stage
with real, overconfident errors). LVLM: SIMULATED by a second, different model, a softmax regression on
the raw pixels; its log-probabilities over CLIP's top-k are the per-candidate scores and its best
candidate the answer. Two models that see the images differently, so gates have something to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cascadevlm.clip.model import encode_images
from cascadevlm.clip.zero_shot import entropy_from_logits
from cascadevlm.data.demo import DEBIAN_DIR, read_idx
from cascadevlm.records import PredictionRecord

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
CLIP_SCALE = 10.0  # features are unit vectors: scaled so the probe trains quickly


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels [N]) of Fashion-MNIST's official ``train`` or ``test`` split."""
    prefix = "t10k" if split == "test" else "train"
    return (
        read_idx(DEBIAN_DIR / f"{prefix}-images-idx3-ubyte.gz"),
        read_idx(DEBIAN_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64),
    )


@torch.no_grad()
def clip_features(bundle, images: np.ndarray, batch_size: int = 1000) -> torch.Tensor:
    """Normalised image features of grayscale images under a CLIP bundle (tensor ops stand in for the
    PIL preprocessing: resize to the model's input size, three channels, CLIP normalisation)."""
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.tensor(images[s : s + batch_size], dtype=torch.float32).div(255.0)[:, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        out.append(encode_images(bundle, (x - CLIP_MEAN) / CLIP_STD))
    return torch.cat(out)


def softmax_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 200, lr: float = 0.05):
    """A linear softmax classifier fitted full-batch with Adam (seeded, deterministic); returns its
    logit function."""
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(x.shape[1], classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(x @ w + b, y).backward()
        opt.step()
    w, b = w.detach(), b.detach()
    return lambda z: z @ w + b


@dataclass
class RoutingRecordSets:
    val: list[PredictionRecord]
    test: list[PredictionRecord]


def make_records(
    logits: torch.Tensor,
    labels: np.ndarray,
    lvlm_logp: torch.Tensor | None,
    topk: int = 5,
    with_logits: bool = True,
) -> list[PredictionRecord]:
    """Records as the CLIP stage and a score-mode LVLM stage (asked about every image) write them."""
    probs = torch.softmax(logits, -1)
    p, ids = probs.topk(max(topk, 5), -1)
    ent = entropy_from_logits(logits)
    recs = []
    for i in range(len(labels)):
        cand = ids[i, :topk].tolist()
        rec = PredictionRecord(
            index=i,
            label=int(labels[i]),
            clip_topk=ids[i].tolist(),
            clip_topk_probs=p[i].tolist(),
            entropy=float(ent[i]),
            clip_pred=int(ids[i, 0]),
            clip_logits=logits[i].tolist() if with_logits else None,
        )
        if lvlm_logp is not None:
            scores = lvlm_logp[i, cand].tolist()
            rec.lvlm_scores = scores
            rec.lvlm_choice = cand[int(np.argmax(scores))]
            rec.lvlm_raw = "ABCDEFGHIJ"[int(np.argmax(scores))]
        recs.append(rec)
    return recs


_MEMO: dict = {}


def fashion_mnist_routing_records(
    bundle, n_val: int = 2000, n_test: int = 2000, n_fit: int = 2000, seed: int = 0, topk: int = 5
) -> RoutingRecordSets:
    """Validation records (from Fashion-MNIST train rows) and test records (official test rows), with a
    simulated LVLM's answers on every image; the probes are fitted on other train rows. Memoised per
    process (test modules share one build; callers must not mutate the records)."""
    key = (bundle.weights_id, n_val, n_test, n_fit, seed, topk)
    if key not in _MEMO:
        _MEMO[key] = _build(bundle, n_val, n_test, n_fit, seed, topk)
    return _MEMO[key]


def _build(bundle, n_val, n_test, n_fit, seed, topk) -> RoutingRecordSets:
    rng = np.random.default_rng(seed)
    tr_x, tr_y = fashion_mnist("train")
    te_x, te_y = fashion_mnist("test")
    perm = rng.permutation(len(tr_y))
    fit_clip, fit_lvlm, val = perm[:n_fit], perm[n_fit : 2 * n_fit], perm[2 * n_fit : 2 * n_fit + n_val]
    test = rng.permutation(len(te_y))[:n_test]
    clip_head = softmax_probe(
        CLIP_SCALE * clip_features(bundle, tr_x[fit_clip]), torch.as_tensor(tr_y[fit_clip]), 10, steps=150
    )

    def pix(x):  # 2x2-pooled pixels (196 values): as good for a linear model, 4x cheaper
        x = torch.tensor(x, dtype=torch.float32)[:, None] / 255.0
        return F.avg_pool2d(x, 2).flatten(1)

    lvlm_head = softmax_probe(pix(tr_x[fit_lvlm]), torch.as_tensor(tr_y[fit_lvlm]), 10, steps=100, lr=0.02)

    def split(x, y):
        logits = clip_head(CLIP_SCALE * clip_features(bundle, x))
        lvlm = torch.log_softmax(lvlm_head(pix(x)), -1)
        return make_records(logits, y, lvlm, topk)

    return RoutingRecordSets(split(tr_x[val], tr_y[val]), split(te_x[test], te_y[test]))
