"""`bench metrics`: our retrieval metrics against a per-row argsort loop (the reference's way), same numbers."""

from __future__ import annotations

import time

import numpy as np
import torch

from mmdistill.metrics import NAN_ERROR, _check_inputs, _summarise, retrieval_metrics


def retrieval_metrics_reference(sim: torch.Tensor, img2txt, txt2img) -> dict[str, float]:
    """Plain per-query argsort implementation of `retrieval_metrics`: the definition that tests check against."""
    txt2img = _check_inputs(sim, img2txt, txt2img)[0]
    if sim.isnan().any():
        raise ValueError(NAN_ERROR)
    ir_ranks = []
    for t, image in enumerate(txt2img.tolist()):
        order = torch.argsort(-sim[:, t], stable=True)
        ir_ranks.append((order == image).nonzero()[0, 0])
    tr_ranks = []
    for i, captions in enumerate(img2txt):
        order = torch.argsort(-sim[i], stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=sim.device)
        tr_ranks.append(position[list(captions)].min())
    return _summarise(torch.stack(ir_ranks).cpu().numpy(), torch.stack(tr_ranks).cpu().numpy())


def _best_time(fn, repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` runs in wall and in CPU seconds (process time, which on a machine shared with other
    jobs leaves out the time they held the core): the least noisy estimates."""
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return min(wall), min(cpu)


def _numpy_argsort_loop(scores: np.ndarray, img2txt, txt2img) -> dict[str, float]:
    """The per-query loop as it is usually written with numpy (a stable argsort per row and per column)."""
    ir_ranks = [np.flatnonzero(np.argsort(-scores[:, t], kind="stable") == image)[0] for t, image in enumerate(txt2img)]
    tr_ranks = []
    for i, captions in enumerate(img2txt):
        order = np.argsort(-scores[i], kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        tr_ranks.append(position[captions].min())
    return _summarise(ir_ranks, tr_ranks)


def _even_split(n_images: int, n_texts: int) -> tuple[list[list[int]], list[int]]:
    """Captions spread evenly over the images, in order (5 each for 1000 x 5000)."""
    txt2img = (np.arange(n_texts) * n_images // n_texts).tolist()
    img2txt = [[] for _ in range(n_images)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return img2txt, txt2img


def bench_metrics(
    n_images: int = 1000,
    n_texts: int = 5000,
    large: tuple[int, int] | None = (5000, 25000),
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Time `retrieval_metrics` against per-query argsort loops (ours in torch, the usual numpy one) on a random
    n_images x n_texts matrix, side by side, and check all three agree; then time it alone on a `large` matrix
    (Flickr30k/COCO test size by default). The counting pass costs the same whatever the ranks are (a trained
    model's matrix, ties, or noise), so a random matrix is representative. The counting runs are short, so they
    are repeated 5x as often: their best time is less likely to include another job's turn on the core.
    """
    if not 1 <= n_images <= n_texts:
        raise ValueError(f"need 1 <= n_images <= n_texts, got {n_images} and {n_texts}")
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(n_images, n_texts, generator=gen)
    img2txt, txt2img = _even_split(n_images, n_texts)
    results = {}
    counting = _best_time(lambda: results.update(counting=retrieval_metrics(sim, img2txt, txt2img)), 5 * repeats)
    torch_loop = _best_time(lambda: results.update(torch=retrieval_metrics_reference(sim, img2txt, txt2img)), repeats)
    numpy_loop = _best_time(lambda: results.update(numpy=_numpy_argsort_loop(sim.numpy(), img2txt, txt2img)), repeats)
    out = {
        "shape": f"{n_images}x{n_texts}",
        "counting_s": counting[0],
        "torch_loop_s": torch_loop[0],
        "numpy_loop_s": numpy_loop[0],
        "speedup": min(torch_loop[0], numpy_loop[0]) / counting[0],
        "counting_cpu_s": counting[1],
        "speedup_cpu": min(torch_loop[1], numpy_loop[1]) / counting[1],
        "equal": results["counting"] == results["torch"] == results["numpy"],
    }
    if large is not None:
        sim = torch.randn(*large, generator=gen)
        img2txt, txt2img = _even_split(*large)
        wall, cpu = _best_time(lambda: retrieval_metrics(sim, img2txt, txt2img), 5 * repeats)
        out.update({f"counting_s_{large[0]}x{large[1]}": wall, f"counting_cpu_s_{large[0]}x{large[1]}": cpu})
    return out
