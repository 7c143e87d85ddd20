import pytest
import torch

from mmdistill.bench.metrics import bench_metrics, retrieval_metrics_reference
from mmdistill.metrics import retrieval_metrics

KEYS = ["IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean"]


def one_caption_each(n):
    return [[i] for i in range(n)], list(range(n))


def random_split(n_images, max_captions, gen):
    """Caption ids shuffled over images, 1..max_captions captions per image."""
    counts = torch.randint(1, max_captions + 1, (n_images,), generator=gen).tolist()
    owners = [i for i, c in enumerate(counts) for _ in range(c)]
    order = torch.randperm(len(owners), generator=gen).tolist()
    txt2img = [owners[t] for t in order]
    img2txt = [[] for _ in range(n_images)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return img2txt, txt2img


@pytest.mark.parametrize("n_images,max_captions", [(1, 1), (2, 3), (7, 1), (15, 5), (40, 4), (120, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(n_images, max_captions, ties):
    gen = torch.Generator().manual_seed(n_images * 10 + max_captions)
    img2txt, txt2img = random_split(n_images, max_captions, gen)
    shape = (n_images, len(txt2img))
    # Integer scores from a small range make ties common, including around rank 10.
    sim = torch.randint(0, 3, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen)
    expected = retrieval_metrics_reference(sim, img2txt, txt2img)
    blocks = ((1, 1), (3, 2), (7, 5)) if n_images <= 15 else ((7, 5), (16, 100))
    for block in blocks + ((64, 4096), (255, 8)):
        assert retrieval_metrics(sim, img2txt, txt2img, block=block) == expected


@pytest.mark.parametrize("kind", ["random", "tied", "trained", "tied-trained"])
def test_counting_matches_argsort_across_blocks(kind):
    """Ragged bands and strips, thresholds switching inside a block, and ground truths on block edges."""
    gen = torch.Generator().manual_seed(7)
    img2txt, txt2img = random_split(150, 5, gen)
    shape = (150, len(txt2img))
    tied = kind.startswith("tied")
    sim = torch.randint(0, 4, shape, generator=gen).float() if tied else torch.randn(shape, generator=gen)
    if kind.endswith("trained"):  # most ground truths near the top, as for a trained model
        sim[torch.tensor(txt2img), torch.arange(len(txt2img))] += 2 if tied else 2.5
    expected = retrieval_metrics_reference(sim, img2txt, txt2img)
    for block in ((64, 4096), (16, 32), (5, 7), (150, 1000)):
        assert retrieval_metrics(sim, img2txt, txt2img, block=block) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_dtypes_keep_their_ties(dtype):
    gen = torch.Generator().manual_seed(3)
    img2txt, txt2img = random_split(40, 3, gen)
    sim = (torch.randint(0, 5, (40, len(txt2img)), generator=gen) * 1000 + 1).to(dtype)
    if dtype.is_floating_point:
        sim = sim / 3000  # values whose float32 images are still distinct where the originals are
    assert retrieval_metrics(sim, img2txt, txt2img) == retrieval_metrics_reference(sim, img2txt, txt2img)


def test_infinite_scores():
    """A ground truth at -inf (where below(-inf) is -inf itself) and +inf entries rank as in the argsort."""
    gen = torch.Generator().manual_seed(5)
    img2txt, txt2img = random_split(20, 3, gen)
    sim = torch.randn(20, len(txt2img), generator=gen)
    sim[0, :] = float("-inf")
    sim[:, 3] = float("-inf")
    sim[5, :7] = float("inf")
    sim[torch.tensor(txt2img[:4]), torch.arange(4)] = float("-inf")
    for block in ((64, 4096), (3, 2)):
        assert retrieval_metrics(sim, img2txt, txt2img, block=block) == retrieval_metrics_reference(
            sim, img2txt, txt2img
        )


def test_keys_are_floats_and_r_mean_is_the_mean():
    gen = torch.Generator().manual_seed(0)
    img2txt, txt2img = random_split(30, 5, gen)
    out = retrieval_metrics(torch.randn(30, len(txt2img), generator=gen), img2txt, torch.tensor(txt2img))
    assert list(out) == KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert out["r_mean"] == pytest.approx(sum(out[k] for k in KEYS[:6]) / 6)


def test_perfect_and_reversed():
    img2txt, txt2img = one_caption_each(12)
    assert set(retrieval_metrics(torch.eye(12), img2txt, txt2img).values()) == {100.0}
    # Every ground-truth pair scores lowest, so each rank is 11.
    assert set(retrieval_metrics(-torch.eye(12), img2txt, txt2img).values()) == {0.0}


def test_constant_scores_rank_by_index():
    """Ties follow the stable order, so a degenerate constant model gets chance-like, not perfect, scores."""
    img2txt, txt2img = one_caption_each(20)
    out = retrieval_metrics(torch.zeros(20, 20), img2txt, txt2img)
    assert out["IR@1"] == out["TR@1"] == 5.0
    assert out["IR@5"] == out["TR@5"] == 25.0
    assert out["IR@10"] == out["TR@10"] == 50.0


def test_signed_zeros_tie():
    sim = torch.tensor([[0.0, -0.0], [-0.0, 0.0]])
    img2txt, txt2img = one_caption_each(2)
    assert retrieval_metrics(sim, img2txt, txt2img)["TR@1"] == 50.0
    assert retrieval_metrics(sim, img2txt, txt2img) == retrieval_metrics_reference(sim, img2txt, txt2img)


def test_image_rank_is_best_caption_rank():
    # Image 0 owns captions 1 and 3; caption 3 is its top score, so TR@1 hits despite caption 1 at rank 3.
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.95], [0.2, 0.8, 0.7, 0.1]])
    img2txt, txt2img = [[1, 3], [0, 2]], [1, 0, 1, 0]
    out = retrieval_metrics(sim, img2txt, txt2img)
    # TR: image 0 -> rank 0 (caption 3); image 1 -> best of captions 0 (rank 2) and 2 (rank 1) = 1.
    assert out["TR@1"] == 50.0 and out["TR@5"] == 100.0
    # IR: captions 0..3 have ground-truth images 1, 0, 1, 0; ranks 1, 1, 0, 0.
    assert out["IR@1"] == 50.0 and out["IR@5"] == 100.0


@pytest.mark.parametrize(
    "sim,img2txt,txt2img",
    [
        (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), [[0], [1]], [0, 1]),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [[0], [1]], [0, 1]),  # NaN off the ground truth
        (torch.zeros(2, 3), [[0], [1]], [0, 1]),
        (torch.zeros(2, 2), [[0, 1], []], [0, 0]),
        (torch.zeros(2, 2), [[0], [1]], [0, 2]),
        (torch.zeros(2, 2), [[0], [5]], [0, 1]),
        (torch.zeros(2, 2), [[1], [0]], [0, 1]),
        (torch.zeros(0, 0), [], []),
    ],
)
def test_rejects_bad_input(sim, img2txt, txt2img):
    with pytest.raises(ValueError):
        retrieval_metrics(sim, img2txt, txt2img)


def test_bench_metrics_small():
    out = bench_metrics(n_images=50, n_texts=250, large=(60, 300), repeats=1)
    assert set(out) == {
        "shape",
        "counting_s",
        "torch_loop_s",
        "numpy_loop_s",
        "speedup",
        "counting_cpu_s",
        "speedup_cpu",
        "equal",
        "counting_s_60x300",
        "counting_cpu_s_60x300",
    }
    assert out["equal"] is True
    assert out["speedup"] == min(out["torch_loop_s"], out["numpy_loop_s"]) / out["counting_s"]
