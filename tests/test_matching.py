"""The matching gradient: tesla == unroll with a detached parameter path, fd ~ tesla, unroll == the true
derivative, dropout masks and blend draws replayed, autograd memory flat in syn_steps (fd keeps one parameter
copy per step beside it), the GPU switches (bfloat16 autocast, channels_last) against float32, and descent on a toy
problem."""

import weakref

import pytest
import torch
from torch import nn

from mmdistill.distill.matching import InnerLoop, InnerPlan, _two_pass, _unroll, matching_gradient
from mmdistill.encoders import ConvNet
from mmdistill.losses import LOSSES
from mmdistill.model import DualEncoder
from mmdistill.similarity import init_similarity, similarity_block

N, TEXT_DIM, PX = 12, 6, 8


class ClampNet(nn.Sequential):
    """In-place ReLU and ReLU6: the other piecewise-linear activations fd holds on their pieces."""

    out_dim = 4 * 4 * 4

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU6(),
            nn.AvgPool2d(2),
            nn.Flatten(),
        )


def problem(dtype=torch.float64, kind="full", dropout=0.0, space="pixel", encoder=None):
    """A tiny student (1-layer ReLU ConvNet, or a projection of frozen features), a synthetic set and a target.

    space: pixel (the ConvNet trains), feature (a projection of frozen features) or frozen-pixel (the same
    projection over a frozen ConvNet that the synthetic pixels go through)."""
    torch.manual_seed(0)
    frozen = space != "pixel"
    encoder = (encoder or ConvNet(PX, depth=1, width=4)).to(dtype)
    model = (
        DualEncoder(encoder, TEXT_DIM, image_trainable=not frozen, embed_dim=5 if frozen else 0, dropout=dropout)
        .to(dtype)
        .train()
    )
    images = torch.randn(N, 64) if space == "feature" else torch.randn(N, 3, PX, PX)
    syn = {
        "images": images,
        "texts": torch.randn(N, TEXT_DIM),
        **init_similarity(kind, N, rank=3),
        "lr_img": torch.tensor([0.1]),
        "lr_txt": torch.tensor([0.1]),
    }
    if kind == "full":  # off the identity, entries in [0, 1]
        syn["sim_full"] = 0.9 * torch.eye(N) + 0.1 * torch.rand(N, N)
    if kind == "lowrank":  # R = 0 at init would give L no gradient
        syn["sim_right"] = 0.1 * torch.randn(N, 3)
    syn = {k: v.to(dtype) for k, v in syn.items()}
    start = {g: t.to(dtype) for g, t in model.get_flat().items()}
    target = {g: t + 0.05 * torch.randn_like(t) for g, t in start.items()}
    return model, syn, start, target


def plan(steps=5, seed=3, blend=None, crop=False):
    return InnerPlan.draw(N, steps, 4, torch.Generator().manual_seed(seed), blend_alpha=blend, crop=crop)


def gradient(setup, inner, mode, kind="full", **kw):
    model, syn, start, target = setup
    return matching_gradient(model, syn, start, target, inner, loss_fn=LOSSES["wbce"], sim_kind=kind, mode=mode, **kw)


def relative_error(grads, reference):
    """Worst relative L2 error over the entries of `syn`."""
    assert grads.keys() == reference.keys()
    return max(((grads[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)


@pytest.mark.parametrize(
    "kind,space,merge",
    [
        ("identity", "pixel", False),
        ("full", "pixel", False),
        ("lowrank", "pixel", False),
        ("full", "pixel", True),
        ("lowrank", "feature", False),
    ],
)
def test_tesla_equals_unroll_with_detached_parameter_path(kind, space, merge):
    setup, inner = problem(kind=kind, space=space), plan()
    loss, tesla = gradient(setup, inner, "tesla", kind, merge_branches=merge)
    loss_unroll, unroll = gradient(setup, inner, "unroll", kind, merge_branches=merge, detach_inner=True)
    assert loss == pytest.approx(loss_unroll, rel=1e-12)
    assert {"images", "texts", "lr_img", "lr_txt"} <= tesla.keys()
    assert relative_error(tesla, unroll) < 1e-6


@pytest.mark.parametrize("mode", ["tesla", "fd", "unroll"])
def test_pixels_through_a_frozen_encoder_are_encoded_once_with_the_same_gradient(mode):
    """Encoding the synthetic pixels once per call and pulling the features' gradient back through the frozen
    encoder gives the gradient of encoding them at every step of every pass. Measured in float64: 1e-16 (tesla,
    unroll), 2e-10 for fd, whose difference quotient divides the round-off of a batch's features by its step."""
    setup, inner = problem(kind="full", space="frozen-pixel", dropout=0.1), plan()
    model, syn, start, target = setup
    encodings = []
    model.frozen_image_encoder.register_forward_hook(lambda *_: encodings.append(1))
    loss, once = gradient(setup, inner, mode)
    assert len(encodings) == 1
    loop = InnerLoop(model, syn, inner, LOSSES["wbce"], "full")
    if mode == "unroll":
        loss_per_step, per_step = _unroll(loop, start, target, merge_branches=False, detach_inner=False)
    else:
        loss_per_step, per_step = _two_pass(loop, start, target, mode, merge_branches=False)
    assert len(encodings) >= 1 + len(inner.batches)  # the per-step path encodes every step's batch in every pass
    assert once["images"].shape == syn["images"].shape
    assert loss == pytest.approx(loss_per_step, rel=1e-12)
    assert relative_error(once, per_step) < (1e-8 if mode == "fd" else 1e-13)


@pytest.mark.parametrize("space", ["frozen-pixel", "pixel"])
def test_an_encoder_that_prefers_nhwc_gets_the_pixels_in_it_with_the_same_gradient(space):
    """Frozen: the set is encoded once per iteration; trained: every step's forward pass (and its replay)."""
    setup, inner = problem(kind="full", space=space), plan()
    encoder = setup[0].frozen_image_encoder if space == "frozen-pixel" else setup[0].image_encoder
    layouts = []
    encoder.register_forward_hook(
        lambda _, args, __: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    _, nchw = gradient(setup, inner, "tesla")
    calls = len(layouts)
    encoder.prefers_channels_last = True
    _, nhwc = gradient(setup, inner, "tesla")
    assert calls == (1 if space == "frozen-pixel" else 2 * len(inner.batches)) and len(layouts) == 2 * calls
    assert not any(layouts[:calls]) and all(layouts[calls:])
    assert relative_error(nhwc, nchw) < 1e-12  # float64: the layout changes the order of sums, nothing else


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-5), (torch.float32, 1e-2)])
@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_fd_matches_tesla(dtype, tolerance, kind):
    """Measured: ~8e-7 in float64 and ~8e-4 in float32 (without frozen ReLU pieces float32 was off by 7x)."""
    setup, inner = problem(dtype, kind), plan()
    loss_fd, fd = gradient(setup, inner, "fd", kind)
    loss_tesla, tesla = gradient(setup, inner, "tesla", kind)
    assert loss_fd == loss_tesla
    assert relative_error(fd, tesla) < tolerance


def test_fd_holds_relu6_and_inplace_relu_on_their_pieces():
    setup = problem(torch.float32, encoder=ClampNet())
    setup[1]["images"] *= 20  # push pre-activations past ReLU6's upper kink too
    _, fd = gradient(setup, plan(), "fd")
    _, tesla = gradient(setup, plan(), "tesla")
    assert relative_error(fd, tesla) < 1e-2
    assert setup[0].image_encoder[1].inplace  # restored after the replay


def test_dropout_masks_are_replayed():
    setup = problem(dropout=0.3)
    _, tesla = gradient(setup, plan(), "tesla")
    _, unroll = gradient(setup, plan(), "unroll", detach_inner=True)
    _, fd = gradient(setup, plan(), "fd")
    assert relative_error(tesla, unroll) < 1e-6
    assert relative_error(fd, tesla) < 1e-5
    other_masks = plan()
    other_masks.seeds = [s + 1 for s in other_masks.seeds]
    _, other = gradient(setup, other_masks, "tesla")
    assert relative_error(other, tesla) > 1e-3  # dropout is live: other masks, other gradient


def test_image_crops_are_drawn_once_and_replayed_in_every_pass(monkeypatch):
    setup, cropped = problem(), plan(crop=True)
    uncropped = plan()
    assert all(torch.equal(a, b) for a, b in zip(cropped.batches, uncropped.batches))  # drawn after the rest
    model = setup[0]
    seen, logits_at = [], model.logits_at
    monkeypatch.setattr(model, "logits_at", lambda flat, x, t, blend=None: seen.append(x) or logits_at(flat, x, t))
    _, tesla = gradient(setup, cropped, "tesla")
    steps = len(cropped.batches)
    assert len(seen) == 2 * steps and all(torch.equal(a, b) for a, b in zip(seen[:steps], seen[steps:]))
    assert not torch.equal(seen[0], setup[1]["images"][cropped.batches[0]])  # the student saw the crops
    _, unroll = gradient(setup, cropped, "unroll", detach_inner=True)
    _, fd = gradient(setup, cropped, "fd")
    assert relative_error(tesla, unroll) < 1e-6  # the crops' pullback onto the synthetic images is exact
    assert relative_error(fd, tesla) < 1e-5
    _, plain = gradient(setup, uncropped, "tesla")
    assert relative_error(plain, tesla) > 1e-2


def test_blend_draws_are_drawn_once_and_reused(monkeypatch):
    setup, inner = problem(), plan(blend=1.0)
    assert all(
        0 < lam < 1 and sorted(perm.tolist()) == list(range(len(b)))
        for (lam, perm), b in zip(inner.blends, inner.batches)
    )
    model = setup[0]
    seen, logits_at = [], model.logits_at
    monkeypatch.setattr(
        model, "logits_at", lambda flat, x, t, blend=None: seen.append(blend) or logits_at(flat, x, t, blend)
    )
    _, tesla = gradient(setup, inner, "tesla")
    assert seen == inner.blends * 2  # pass 1, then the replay: the same (lam, perm) objects, step by step
    seen.clear()
    _, unroll = gradient(setup, inner, "unroll", detach_inner=True)
    assert relative_error(tesla, unroll) < 1e-6
    _, unblended = gradient(setup, plan(), "tesla")
    assert relative_error(unblended, tesla) > 1e-3


def test_unroll_is_the_derivative_of_the_matching_loss():
    """Central differences of L along a random direction of every synthetic tensor (float64)."""
    model, syn, start, target = setup = problem(kind="lowrank")
    inner = plan()
    loss, grads = gradient(setup, inner, "unroll", "lowrank")
    gen = torch.Generator().manual_seed(7)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in syn.items()}
    h = 1e-6

    def loss_at(sign):
        moved = {k: v + sign * h * direction[k] for k, v in syn.items()}
        return gradient((model, moved, start, target), inner, "unroll", "lowrank")[0]

    numeric = (loss_at(1) - loss_at(-1)) / (2 * h)
    analytic = sum((grads[k] * direction[k]).sum().item() for k in syn)
    assert analytic == pytest.approx(numeric, rel=1e-5)
    _, tesla = gradient(setup, inner, "tesla", "lowrank")
    assert relative_error(tesla, grads) > 1e-3  # unroll keeps the parameter path that tesla drops


class SavedTensorBytes:
    """Peak bytes held by autograd graphs (saved for backward), via saved-tensor hooks."""

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda box: box.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def pack(self, tensor):
        box = _Box(tensor.detach())  # detached: a saved output would otherwise form a cycle through its grad_fn
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, size)
        return box

    def _free(self, size):
        self.live -= size


class _Box:
    def __init__(self, tensor):
        self.tensor = tensor


@pytest.mark.parametrize("mode,flat", [("fd", True), ("tesla", True), ("unroll", False)])
def test_memory_does_not_grow_with_steps(mode, flat):
    setup = problem()
    peaks = []
    for steps in (3, 12):
        with SavedTensorBytes() as saved:
            gradient(setup, plan(steps), mode)
        peaks.append(saved.peak)
    if flat:
        assert peaks[1] <= 1.05 * peaks[0]
    else:  # the measurement does see a graph that grows
        assert peaks[1] > 3 * peaks[0]


def test_fd_records_one_point_per_step_and_frees_them_in_pass_two():
    model, syn, start, target = problem(torch.float32)
    inner = plan(steps=4)
    loop = InnerLoop(model, syn, inner, LOSSES["wbce"], "full")
    theta_n, _, steps = loop.run(start, record=True)
    plain_n, _ = loop.run(start)
    assert len(steps) == 4 and all(torch.equal(theta_n[g], plain_n[g]) for g in theta_n)  # same path either way
    assert all(steps[0].theta[g].data_ptr() == start[g].data_ptr() for g in start)  # theta_0 is not copied
    assert [len(s.activations) for s in steps] == [1] * 4  # the ConvNet's one ReLU, per step
    assert [tuple(s.base[0].shape) for s in steps] == [(len(b), 3, PX, PX) for b in inner.batches]
    v = {g: torch.randn_like(t) for g, t in start.items()}
    loop.replay(start, v, tesla=False, fd_step=1e-4, steps=steps)
    assert steps == [None] * 4


@pytest.mark.parametrize("mode", ["fd", "tesla", "unroll"])
def test_the_in_place_steps_leave_the_callers_points_and_set_alone(mode):
    model, syn, start, target = problem(torch.float32)
    before = {name: {k: v.clone() for k, v in d.items()} for name, d in (("start", start), ("target", target))}
    syn_before = {k: v.clone() for k, v in syn.items()}
    gradient((model, syn, start, target), plan(steps=4), mode)
    gradient((model, syn, start, target), plan(steps=4), mode)
    assert all(torch.equal(start[g], before["start"][g]) and torch.equal(target[g], before["target"][g]) for g in start)
    assert all(torch.equal(syn[k], syn_before[k]) for k in syn)


def test_pass_one_writes_each_new_point_over_its_gradient():
    """No new parameter-sized block per step. On NFNet-L0 (33 M parameters) glibc maps such blocks afresh and the
    kernel faults their pages in at every step: an fd iteration at 64 px took 11.7 s before, 9.2 s after (README)."""
    model, syn, start, target = problem(torch.float32)
    loop = InnerLoop(model, syn, plan(steps=3), LOSSES["wbce"], "full")
    seen = []
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        grads = original(*args, **kwargs)
        seen.append({g.data_ptr() for g in grads})
        return grads

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmdistill.distill.matching.autograd.grad", spy)
        theta_n, _, steps = loop.run(start, record=True)
    points = [{t.data_ptr() for t in step.theta.values()} for step in steps[1:]] + [
        {t.data_ptr() for t in theta_n.values()}
    ]
    assert all(point <= grads for point, grads in zip(points, seen))


def test_bfloat16_autocast_gradient_error_against_float32(record_property):
    """The GPU switch on CPU: autocast's gradient against the float32 tesla one, reported (pytest -s shows it)."""
    model, syn, start, target = problem(torch.float32, encoder=ConvNet(PX, depth=2, width=8))
    inner = plan(steps=6)
    _, reference = gradient((model, syn, start, target), inner, "tesla")
    errors = {
        mode: relative_error(gradient((model, syn, start, target), inner, mode, autocast=True)[1], reference)
        for mode in ("fd", "tesla")
    }
    _, float32_fd = gradient((model, syn, start, target), inner, "fd")
    errors["fd float32"] = relative_error(float32_fd, reference)
    for mode, error in errors.items():
        record_property(f"relative_error_{mode.replace(' ', '_')}", error)
    print(
        f"\nbfloat16 autocast, relative gradient error vs float32 tesla: fd {errors['fd']:.3f}, "
        f"tesla {errors['tesla']:.3f} (float32 fd: {errors['fd float32']:.4f})"
    )
    assert errors["fd float32"] < 0.01
    assert 0 < errors["tesla"] < 0.25 and 0 < errors["fd"] < 0.35  # bfloat16 keeps 8 significant bits


def test_channels_last_gives_the_nchw_gradient():
    setup = problem(torch.float32, encoder=ConvNet(PX, depth=2, width=8))
    inner = plan(steps=4)
    _, nchw = gradient(setup, inner, "fd")
    _, nhwc = gradient(setup, inner, "fd", channels_last=True)
    assert relative_error(nhwc, nchw) < 1e-2  # other convolution kernels: float32 rounding only


def test_plan_slices_a_permutation_and_reshuffles_instead_of_a_short_remainder():
    """10 pairs in batches of 4: two full slices per permutation, then a fresh one (the remainder of 2 used to be
    a step of its own, on a batch whose loss is on another scale)."""
    inner = InnerPlan.draw(10, 5, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in inner.batches] == [4, 4, 4, 4, 4]
    gen = torch.Generator().manual_seed(0)
    first, second, third = (torch.randperm(10, generator=gen) for _ in range(3))
    expected = [first[:4], first[4:8], second[:4], second[4:8], third[:4]]
    assert all(torch.equal(b, e) for b, e in zip(inner.batches, expected))
    assert len(set(inner.seeds)) == 5 and inner.blends == [None] * 5


def test_matching_loss_decreases_under_sgd():
    model, syn, start, target = problem(torch.float32, "full")
    inner = plan()
    rates = {"images": 10.0, "texts": 10.0, "sim_full": 1.0, "lr_img": 1e-3, "lr_txt": 1e-3}
    losses = []
    for _ in range(8):
        loss, grads = gradient((model, syn, start, target), inner, "fd")
        losses.append(loss)
        syn = {k: v - rates[k] * grads[k] for k, v in syn.items()}
    assert losses[-1] < 0.9 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("mode", ["tesla", "unroll"])
def test_merged_branches_merge_the_data_gradient_but_not_the_lr_gradients(mode):
    """LoRS's --merge_loss_branches: images, texts and S follow the merged loss; each lr the gradient of its own
    branch's term, d/dalpha_m ||theta_0 - alpha_m G_m - theta*||^2 / D_m = -2 (theta_N - theta*) . G_m / D_m."""
    setup, inner = problem(kind="full"), plan()
    detach = {"detach_inner": True} if mode == "unroll" else {}  # TESLA's G: the parameter path cut
    _, merged = gradient(setup, inner, mode, merge_branches=True, **detach)
    _, separate = gradient(setup, inner, mode, merge_branches=False, **detach)
    if mode == "unroll":  # the true gradient: the lrs too follow their own branch
        _, merged_true = gradient(setup, inner, mode, merge_branches=True)
        _, separate_true = gradient(setup, inner, mode, merge_branches=False)
        for key in ("lr_img", "lr_txt"):
            assert merged_true[key].item() == pytest.approx(separate_true[key].item(), rel=1e-10)
    model, syn, start, target = setup
    # the transcription: G_m by hand, with plain SGD steps on the same plan (no dropout in this student)
    theta, total = dict(start), {m: torch.zeros_like(t) for m, t in start.items()}
    alpha = {"img": syn["lr_img"], "txt": syn["lr_txt"]}
    for index in inner.batches:
        point = {m: t.detach().requires_grad_() for m, t in theta.items()}
        sim = similarity_block("full", {"sim_full": syn["sim_full"]}, index, 1.0)
        loss = LOSSES["wbce"](model.logits_at(point, syn["images"][index], syn["texts"][index]), sim)
        grads = torch.autograd.grad(loss, list(point.values()))
        for m, g in zip(point, grads):
            total[m] += g
            theta[m] = theta[m] - alpha[m] * g
    for m, key in (("img", "lr_img"), ("txt", "lr_txt")):
        expected = -2 * ((theta[m] - target[m]) * total[m]).sum() / (start[m] - target[m]).square().sum()
        assert merged[key].item() == pytest.approx(expected.item(), rel=1e-8)
        assert separate[key].item() == pytest.approx(expected.item(), rel=1e-8)
    assert relative_error({"images": merged["images"]}, {"images": separate["images"]}) > 1e-3  # data: merged
