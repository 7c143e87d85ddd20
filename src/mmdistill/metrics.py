"""Image-text retrieval metrics (recall at K in both directions) by counting.

The plain per-query argsort implementation that tests and `mmdistill bench metrics` check them against is
`retrieval_metrics_reference` in `mmdistill/bench/metrics.py`.

Rank convention (both implementations): the rank of a ground-truth candidate is its position in a stable
descending sort of the query's scores, i.e. the number of candidates scoring strictly higher plus the number
of candidates with an equal score and a smaller index. This equals the position in
`torch.argsort(-scores, stable=True)`, so ties are neither all won nor all lost: a constant similarity matrix
does not score 100.

No sort is needed: a rank is a count. With the ground truth's score s* at index g, the rank is
#{j < g: s_j >= s*} + #{j > g: s_j > s*}, and s_j >= s* is s_j > nextafter(s*, -inf) in floating point. So one
pass over the matrix, block by block, compares each entry with its column's threshold (text -> image) and with
its row's threshold (image -> text) and adds up the counts; a block holding a query's ground truth uses the
strict threshold and counts the equal entries before it separately. Memory beyond the matrix is one block.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")
RECALL_KS = (1, 5, 10)
EMBED_BATCH = 512  # images or captions per forward pass when embedding a whole split
BLOCK = (64, 4096)  # rows x columns counted at a time: 1 MiB of float32 that every comparison reads in cache
NAN_ERROR = "sim contains NaN: ranks are undefined"


def _check_inputs(sim: torch.Tensor, img2txt, txt2img) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and ids; return txt2img and the (image, caption) pairs of img2txt as LongTensors."""
    if sim.ndim != 2 or sim.numel() == 0:
        raise ValueError(f"sim must be a non-empty images x texts matrix, got shape {tuple(sim.shape)}")
    n_images, n_texts = sim.shape
    if len(img2txt) != n_images or len(txt2img) != n_texts:
        raise ValueError(
            f"sim is {n_images} x {n_texts} but there are {len(img2txt)} images and {len(txt2img)} captions"
        )
    if any(len(caps) == 0 for caps in img2txt):
        raise ValueError("every image needs at least one caption")
    device = sim.device
    txt2img = torch.as_tensor(txt2img, dtype=torch.long, device=device)
    pair_txt = torch.tensor([c for caps in img2txt for c in caps], dtype=torch.long, device=device)
    pair_img = torch.repeat_interleave(
        torch.arange(n_images, device=device), torch.tensor([len(caps) for caps in img2txt], device=device)
    )
    if txt2img.min() < 0 or txt2img.max() >= n_images:
        raise ValueError("txt2img has image ids outside [0, number of images)")
    if pair_txt.min() < 0 or pair_txt.max() >= n_texts or (txt2img[pair_txt] != pair_img).any():
        raise ValueError("img2txt disagrees with txt2img (or has caption ids out of range)")
    return txt2img, pair_img, pair_txt


def _summarise(ir_ranks, tr_ranks) -> dict[str, float]:
    """Recall@K in percent for both directions and their mean."""
    out = {}
    for name, ranks in (("IR", np.asarray(ir_ranks)), ("TR", np.asarray(tr_ranks))):
        for k in RECALL_KS:
            out[f"{name}@{k}"] = 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks)
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def _as_array(sim: torch.Tensor) -> np.ndarray:
    """The scores as a C-contiguous CPU array of a float type that holds each of them exactly (float16 and
    bfloat16 widen to float32, integers to float64), so that ties stay ties."""
    sim = sim.detach()
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.to(torch.float32 if sim.is_floating_point() else torch.float64)
    return sim.cpu().contiguous().numpy()


def _best_caption(scores: np.ndarray, pair_img: np.ndarray, pair_txt: np.ndarray) -> np.ndarray:
    """The ground-truth caption of each image that comes first in the stable descending order.

    Its rank is the smallest rank among the image's captions: highest score, then smallest caption id.
    """
    n_images, n_texts = scores.shape
    pair_score = scores[pair_img, pair_txt]
    best_score = np.full(n_images, -np.inf, dtype=scores.dtype)
    if np.isnan(pair_score).any():
        raise ValueError(NAN_ERROR)
    np.maximum.at(best_score, pair_img, pair_score)
    first = np.full(n_images, n_texts, dtype=np.int64)
    np.minimum.at(first, pair_img, np.where(pair_score == best_score[pair_img], pair_txt, n_texts))
    return first


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """True entries per row of a C-contiguous bool matrix; 8 at a time (a popcount of each 8-byte word, whose
    bytes are 0 or 1) where the rows are a whole number of words: about twice as fast as a plain sum."""
    if mask.shape[1] % 8 or not mask.flags.c_contiguous:
        return np.add.reduce(mask, axis=1, dtype=np.int32)
    return np.add.reduce(np.bitwise_count(mask.view(np.uint64)), axis=1, dtype=np.int32)


def _ties_before(values: np.ndarray, thr: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row of `values` (one query each): the entries equal to the query's threshold at positions below
    `before`. Most rows hold only their ground truth at that score, so only rows with a second equal entry
    are masked by position."""
    equal = values == thr[:, None]
    counts = np.zeros(len(values), np.int64)
    tied = np.flatnonzero(_row_counts(equal) > 1)
    if len(tied):
        earlier = np.arange(values.shape[1]) < before[tied, None]
        counts[tied] = _row_counts(equal[tied] & earlier)
    return counts


def _counting_ranks(
    scores: np.ndarray, col_target: np.ndarray, row_target: np.ndarray, block: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stable-sort ranks of the ground truth of each column (row col_target[t]) among its column, and of each
    row (column row_target[i]) among its row, in one pass over `scores`; raises ValueError on a NaN.

    The pass goes through blocks of block[0] rows x block[1] columns. A column's threshold is its ground
    truth's score s*: `s > below(s*)` (that is s >= s*) in the blocks above the ground truth's, `s > s*` from
    that block on, plus the entries equal to s* above the ground truth inside its block; rows likewise, left
    to right. Queries whose s* is -inf (below(-inf) is -inf itself) are recounted directly at the end.
    """
    n_rows, n_cols = scores.shape
    band, width = min(block[0], n_rows), min(block[1], n_cols)
    col_thr = scores[col_target, np.arange(n_cols)]
    row_thr = scores[np.arange(n_rows), row_target]
    col_below, row_below = np.nextafter(col_thr, -np.inf), np.nextafter(row_thr, -np.inf)
    col_ranks, row_ranks = np.zeros(n_cols, np.int64), np.zeros(n_rows, np.int64)
    cols_by_target = np.argsort(col_target, kind="stable")
    band_edges = np.searchsorted(col_target[cols_by_target], np.arange(0, n_rows + band, band))
    hits = np.empty(band * width, dtype=bool)
    nan = False
    for index, a in enumerate(range(0, n_rows, band)):
        b = min(a + band, n_rows)
        band_col_thr = np.where(col_target >= b, col_below, col_thr)
        targets = row_target[a:b]
        for c in range(0, n_cols, width):
            d = min(c + width, n_cols)
            view = scores[a:b, c:d]
            nan |= bool(np.isnan(np.maximum.reduce(view, axis=1)).any())
            mask = hits[: view.size].reshape(view.shape)
            np.greater(view, band_col_thr[c:d], out=mask)
            col_ranks[c:d] += np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8)  # band <= 255 rows
            np.greater(view, np.where(targets >= d, row_below[a:b], row_thr[a:b])[:, None], out=mask)
            row_ranks[a:b] += _row_counts(mask)
            local = np.flatnonzero((targets >= c) & (targets < d))  # rows whose ground truth is in this block
            if len(local):
                row_ranks[a + local] += _ties_before(view[local], row_thr[a + local], targets[local] - c)
        cols = cols_by_target[band_edges[index] : band_edges[index + 1]]  # columns whose ground truth is in this band
        if len(cols):
            col_ranks[cols] += _ties_before(scores[a:b, cols].T, col_thr[cols], col_target[cols] - a)
    if nan:
        raise ValueError(NAN_ERROR)
    for ranks, lines, target, thr in (
        (col_ranks, scores.T, col_target, col_thr),
        (row_ranks, scores, row_target, row_thr),
    ):
        for q in np.flatnonzero(thr == -np.inf):
            line = lines[q]
            ranks[q] = np.count_nonzero(line > thr[q]) + np.count_nonzero(line[: target[q]] == thr[q])
    return col_ranks, row_ranks


def retrieval_metrics(sim: torch.Tensor, img2txt, txt2img, block: tuple[int, int] = BLOCK) -> dict[str, float]:
    """Recall@1/5/10 in percent for text->image (IR) and image->text (TR) retrieval, and their mean r_mean.

    sim: images x texts scores (higher = more similar), on any device (counted on the CPU); img2txt: caption
    ids of each image; txt2img: image id of each caption. IR ranks each caption's image among all images; TR
    takes, per image, the best rank among its captions. Ranks follow the stable-argsort convention of the
    module docstring, so results equal `bench.metrics.retrieval_metrics_reference` exactly, ties included.
    `block` (rows at most 255, columns) sets the piece of the matrix counted at a time; it changes speed, not
    results.
    """
    if not (1 <= block[0] <= 255 and block[1] >= 1):
        raise ValueError(f"block must be (1..255 rows, >= 1 columns), got {block}")
    txt2img, pair_img, pair_txt = _check_inputs(sim, img2txt, txt2img)
    scores = _as_array(sim)
    best = _best_caption(scores, pair_img.cpu().numpy(), pair_txt.cpu().numpy())
    ir_ranks, tr_ranks = _counting_ranks(scores, txt2img.cpu().numpy(), best, block)
    return _summarise(ir_ranks, tr_ranks)


@torch.no_grad()
def embed(model, image_chunks, texts: torch.Tensor, device, batch_size: int = EMBED_BATCH):
    """A dual encoder's image and text embeddings in eval mode (no dropout); leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    image_emb = torch.cat([model.encode_image(chunk.to(device)) for chunk in image_chunks])
    text_emb = torch.cat([model.encode_text(chunk.to(device)) for chunk in texts.split(batch_size)])
    model.train(was_training)
    return image_emb, text_emb


def model_recall(model, image_chunks, texts: torch.Tensor, img2txt, txt2img, device) -> dict[str, float] | None:
    """Retrieval metrics of a dual encoder on one split (its image inputs in chunks, its caption features): the
    scoring that expert validation and student evaluation share. None when the embeddings are not finite."""
    image_emb, text_emb = embed(model, image_chunks, texts, device)
    sim = model.similarity(image_emb, text_emb)
    if not torch.isfinite(sim).all():
        return None
    return retrieval_metrics(sim.cpu(), img2txt, txt2img)
