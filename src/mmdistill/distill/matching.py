"""The gradient of the trajectory-matching loss with respect to the synthetic set.

The student starts at an expert snapshot theta_0 and takes N = syn_steps SGD steps on mini-batches of the
synthetic set, g_i = grad_theta l(theta_i; X_Bi, T_Bi, S_BiBi), theta_{i+1} = theta_i - alpha sg(g_i), so
theta_N = theta_0 - alpha G with G = sum_i g_i. The matching loss is
L = sum_m ||theta_N^m - theta*^m||^2 / D_m, D_m = ||theta_0^m - theta*^m||^2, over the groups m in {img, txt}.
With `merge_branches` (LoRS) the data's gradient comes from sum_m ||.||^2 / sum_m D_m instead, while each
student lr still takes the gradient of its own branch's term, as LoRS computes them.

Three modes, one signature:
- tesla (called `exact` before): TESLA's constant-memory gradient.
  dL/dg_i = v = -alpha dL/dtheta_N is the same for every step, so
  pass 1 runs the loop without graphs (only theta_N and G survive it) and pass 2 replays it from theta_0 and
  backpropagates v . g_i into the step's inputs with a double backward. Nothing per step is stored.
- fd: pass 2 swaps the double backward for a finite-difference Hessian-vector product,
  d/dx (v . grad_theta l(theta_i, x)) ~ [grad_x l(theta_i + eps v, x) - grad_x l(theta_i, x)] / eps,
  with ReLU-type activations held on the pieces the base gradient chose (`_FrozenPieces`). The base gradient
  grad_x l(theta_i, x) comes from pass 1, which keeps it with theta_i and the pieces of every step (one
  parameter copy per step, as the reference keeps its whole student trajectory), so pass 2 is one backward
  into the inputs per step. On CPU, 1 thread, an iteration costs 2.10x (shapes-100), 2.22x (shapes-scratch-100)
  and 1.63x (NFNet-L0 at 64 px) the CPU time of N plain training steps, against 3.44x, 2.99x and 2.58x when
  pass 2 recomputed the base gradient (README's speed table; `mmdistill bench iteration` measures them); its
  float32 gradient is within 0.5% of a float64 tesla one (closer than float32 tesla, 2.4%).
- unroll: autograd through the whole loop, parameter path included (MTT-VL); memory grows with N.
  `detach_inner=True` cuts the parameter path, which is exactly what tesla and fd compute (used by tests).

Every random choice of the loop (mini-batches, blend draws, dropout masks, image crops) is drawn once in an
`InnerPlan` and replayed in every pass; the reference redraws dropout masks in its recompute pass,
which makes its second pass differ from its first; we do not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import autograd, nn

from mmdistill.data.transforms import CropDraw, apply_crops, draw_crops
from mmdistill.similarity import full_matrix, similarity_block

LR_KEYS = {"img": "lr_img", "txt": "lr_txt"}  # the learnable student learning rate of each parameter group


@dataclass
class InnerPlan:
    """The random choices of one inner loop, drawn once and replayed identically in every pass."""

    batches: list[torch.Tensor]  # synthetic indices of each step
    seeds: list[int]  # dropout seed of each step
    blends: list[tuple[float, torch.Tensor] | None]  # (lam, perm) of each step, or None without blending
    crops: list[CropDraw] | None = None  # the random resized crops of each step's images, or None without crops

    @classmethod
    def draw(
        cls,
        n: int,
        steps: int,
        batch_size: int,
        gen: torch.Generator,
        blend_alpha: float | None = None,
        device: torch.device | str = "cpu",
        crop: bool = False,
    ) -> InnerPlan:
        """Consecutive slices of a random permutation of the n pairs, a new permutation when fewer than
        `batch_size` are left (as the reference draws them: a short remainder would be a step on a tiny batch,
        whose loss is on another scale than the others'). `crop`: a random resized crop of every image of every
        step (the experts' `crop` augmentation; drawn last, so the other draws are those of a plan without it)."""
        batches, chunks = [], []
        for _ in range(steps):
            if not chunks:
                chunks = [c for c in torch.randperm(n, generator=gen).split(batch_size) if len(c) == batch_size]
            batches.append(chunks.pop(0))
        seeds = torch.randint(1 << 62, (steps,), generator=gen).tolist()
        blends = [None] * steps
        if blend_alpha is not None:
            lam_rng = np.random.default_rng(int(torch.randint(1 << 62, (1,), generator=gen)))
            blends = [
                (float(lam_rng.beta(blend_alpha, blend_alpha)), torch.randperm(len(b), generator=gen).to(device))
                for b in batches
            ]
        crops = [draw_crops(len(b), gen, flip=False) for b in batches] if crop else None
        return cls([b.to(device) for b in batches], seeds, blends, crops)


def matching_loss(
    theta_n: dict[str, torch.Tensor],
    theta_start: dict[str, torch.Tensor],
    theta_target: dict[str, torch.Tensor],
    merge_branches: bool = False,
) -> torch.Tensor:
    """Normalised distance to the target, per branch (or LoRS's merged form: one sum over one denominator)."""
    num = {m: (theta_n[m] - theta_target[m]).square().sum() for m in theta_n}
    den = {m: (theta_start[m] - theta_target[m]).square().sum() for m in theta_n}
    if merge_branches:
        return sum(num.values()) / sum(den.values())
    return sum(num[m] / den[m] for m in theta_n)


def sgd_step(
    theta: dict[str, torch.Tensor], grads, alpha: dict[str, torch.Tensor], into_grads: bool = False
) -> dict[str, torch.Tensor]:
    """theta - alpha g per group; every pass steps through this one line, so a replay lands on the same points.

    `into_grads` writes the new point over the gradients (no new parameter-sized block per step), for a caller
    that has no further use for them and no graph through them."""
    return {
        m: torch.addcmul(theta[m], alpha[m], g, value=-1, out=g if into_grads else None) for m, g in zip(theta, grads)
    }


class InnerLoop:
    """The student's N steps on the synthetic set, runnable with and without graphs, any number of times."""

    def __init__(
        self,
        model,
        syn: dict[str, torch.Tensor],
        plan: InnerPlan,
        loss_fn,
        sim_kind: str,
        sim_alpha: float = 1.0,
        autocast: bool = False,
        channels_last: bool = False,
    ):
        """`autocast`: the student's forward passes in bfloat16; `channels_last`: images in NHWC layout (both
        for GPUs: config keys distill.autocast / distill.channels_last)."""
        self.model, self.plan, self.loss_fn = model, plan, loss_fn
        self.autocast, self.channels_last = autocast, channels_last
        self.sim_kind, self.sim_alpha = sim_kind, sim_alpha
        self.syn = {k: v.detach() for k, v in syn.items()}
        self.alpha = {m: self.syn[key] for m, key in LR_KEYS.items()}
        self.learned = ["images", "texts"] + ([] if sim_kind == "identity" else ["target"])
        self.dropout_rng = _device_generator(self.syn["images"].device)

    def inputs(self, i: int, syn: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Step i's images, texts and target block S[B, B], differentiable in `syn`."""
        syn = self.syn if syn is None else syn
        index = self.plan.batches[i]
        sim = {k: v for k, v in syn.items() if k.startswith("sim_")}
        target = similarity_block(self.sim_kind, sim, index, self.sim_alpha).to(syn["images"])
        images = syn["images"][index]
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"images": images, "texts": syn["texts"][index], "target": target}

    def leaves(self, i: int) -> dict[str, torch.Tensor]:
        """Step i's inputs cut from the synthetic set, as leaves that collect their own gradients."""
        return {k: v.detach().requires_grad_(k in self.learned) for k, v in self.inputs(i).items()}

    def loss(self, i: int, theta: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's loss at step i; its dropout masks come from the step's seed and its images' crops from
        the plan, the same in every pass. The crops sit between the leaves and the student, so the leaves'
        gradients are those of the synthetic images themselves."""
        images = inputs["images"]
        if self.plan.crops is not None:
            images = apply_crops(images, self.plan.crops[i], images.shape[-1])
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        saved = self.dropout_rng.get_state()
        self.dropout_rng.manual_seed(self.plan.seeds[i])
        try:
            with torch.autocast(images.device.type, torch.bfloat16, enabled=self.autocast):
                logits = self.model.logits_at(theta, images, inputs["texts"], self.plan.blends[i])
        finally:
            self.dropout_rng.set_state(saved)
        return self.loss_fn(logits.to(inputs["target"].dtype), inputs["target"])  # back from bfloat16 under autocast

    def run(self, theta_0: dict[str, torch.Tensor], record: bool = False):
        """Pass 1: theta_N and G = sum_i g_i, without keeping any graph.

        With `record` (fd), also what fd's second pass needs from every step, as a list of
        `_Step`: its point theta_i (one parameter copy per step: memory O(N P), like the reference's stored
        trajectory), its inputs' gradients and its activation pieces; fd's second pass then runs only the
        shifted half (about 2x instead of 3x the cost of N plain steps). Without it nothing per step is kept.
        """
        theta, total = theta_0, {m: torch.zeros_like(t) for m, t in theta_0.items()}
        steps = []
        with _FrozenPieces(self.model) if record else contextlib.nullcontext() as pieces:
            for i in range(len(self.plan.batches)):
                point = {m: t.detach().requires_grad_() for m, t in theta.items()}
                if record:
                    inputs = self.leaves(i)
                    with pieces.record() as activations:
                        loss = self.loss(i, point, inputs)
                    learned = [inputs[k] for k in self.learned]
                    grads = autograd.grad(loss, list(point.values()) + learned)
                    grads, base = grads[: len(point)], grads[len(point) :]
                    steps.append(_Step({m: t.detach() for m, t in point.items()}, base, activations))
                else:
                    grads = autograd.grad(self.loss(i, point, self.inputs(i)), list(point.values()))
                for m, g in zip(total, grads):
                    total[m].add_(g)
                theta = sgd_step(theta, grads, self.alpha, into_grads=True)
        return (theta, total, steps) if record else (theta, total)

    def replay(
        self,
        theta_0: dict[str, torch.Tensor],
        v: dict[str, torch.Tensor],
        tesla: bool,
        fd_step: float,
        steps: list[_Step] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pass 2: sum_i d(v . g_i)/d(inputs of step i), scattered back onto the synthetic set.

        `tesla` replays the loop from theta_0 with a double backward per step; otherwise (fd) each step's point,
        base gradients and pieces come from the `steps` its recording pass 1 kept, each freed once used.
        """
        scatter = _Scatter(self)
        eps = fd_step * (_norm(theta_0) / _norm(v).clamp_min(torch.finfo(v["img"].dtype).tiny)).item()
        theta = theta_0
        with _FrozenPieces(self.model) as pieces:
            for i in range(len(self.plan.batches)):
                inputs = self.leaves(i)
                learned = [inputs[k] for k in self.learned]
                if tesla:
                    point = {m: t.detach().requires_grad_() for m, t in theta.items()}
                    grads = autograd.grad(self.loss(i, point, inputs), list(point.values()), create_graph=True)
                    hvp = autograd.grad(sum((v[m] * g).sum() for m, g in zip(point, grads)), learned)
                    theta = sgd_step(theta, [g.detach() for g in grads], self.alpha)
                else:
                    step, steps[i] = steps[i], None
                    # theta_i is dropped after this step, so it is shifted in place (no new parameter-sized
                    # block per step); theta_0 is the caller's and is copied
                    shifted = {m: (t if i else t.clone()).add_(v[m], alpha=eps) for m, t in step.theta.items()}
                    with pieces.replay(step.activations):
                        moved = autograd.grad(self.loss(i, shifted, inputs), learned)
                    hvp = [(a - b) / eps for a, b in zip(moved, step.base)]
                scatter.add(i, dict(zip(self.learned, hvp)))
        return scatter.result()


@dataclass
class _Step:
    """What fd's second pass needs from step i of the first: theta_i, the gradients of the step's learned
    inputs at theta_i, and the activation pieces chosen there."""

    theta: dict[str, torch.Tensor]
    base: tuple[torch.Tensor, ...]
    activations: list[torch.Tensor]


def _device_generator(device: torch.device) -> torch.Generator:
    """The global generator that dropout on `device` draws from. The inner loop seeds only this one per step:
    torch.manual_seed would also queue a seed, with a formatted stack trace, for every CUDA device not yet
    initialised, which cost a fifth of a shapes-100 iteration on CPU."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _FrozenPieces:
    """Keeps fd's shifted pass on the linear pieces that the base pass chose (ReLU, ReLU6 / Hardtanh).

    Where an activation changes piece between theta_i and theta_i + eps v, the difference quotient picks up the
    jump of its derivative divided by eps; in a float32 ReLU ConvNet that noise swamps the image gradient (cosine
    ~0.1 to the tesla one). With the pieces frozen the quotient converges to the mixed derivative that the
    tesla mode computes. Activations called as functions (F.relu) are not seen; smooth ones need nothing.
    """

    def __init__(self, model):
        self.modules = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Hardtanh))]
        self.mode, self.pieces = None, []

    def __enter__(self):
        self.inplace = [m.inplace for m in self.modules]
        for m in self.modules:
            m.inplace = False  # the replay needs the activation's input unchanged
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for m, inplace in zip(self.modules, self.inplace):
            m.inplace = inplace

    @contextlib.contextmanager
    def record(self):
        """Collects the pieces of the forward passes inside, into the list it yields."""
        self.mode, self.pieces = "record", []
        yield self.pieces
        self.mode = None

    @contextlib.contextmanager
    def replay(self, pieces: list[torch.Tensor]):
        """The forward passes inside stay on `pieces`, in the order they were recorded."""
        self.mode, self.pieces = "replay", iter(pieces)
        yield
        self.mode = None

    def _hook(self, module, args, output):
        if self.mode == "record":
            self.pieces.append(output.detach())
        elif self.mode == "replay":
            base = next(self.pieces)
            if isinstance(module, nn.ReLU):
                return args[0] * base.sign()  # ReLU outputs are >= 0: sign() is the float 0/1 mask in one op
            linear = (base > module.min_val) & (base < module.max_val)
            return base + (args[0] - base) * linear  # the input where the base was linear, else the base output
        return None


class _Scatter:
    """Sums per-step input gradients onto the whole synthetic set (repeated indices add up)."""

    def __init__(self, loop: InnerLoop):
        self.loop = loop
        self.sums = {"images": torch.zeros_like(loop.syn["images"]), "texts": torch.zeros_like(loop.syn["texts"])}
        if "target" in loop.learned:
            n = len(loop.syn["images"])
            self.sums["target"] = loop.syn["images"].new_zeros(n, n)

    def add(self, i: int, grads: dict[str, torch.Tensor]) -> None:
        index = self.loop.plan.batches[i]
        self.sums["images"].index_add_(0, index, grads["images"])
        self.sums["texts"].index_add_(0, index, grads["texts"])
        if "target" in grads:
            self.sums["target"].index_put_((index[:, None], index[None, :]), grads["target"], accumulate=True)

    def result(self) -> dict[str, torch.Tensor]:
        """Gradients of images, texts and the similarity parameters (through S = full_matrix(params))."""
        grads = {"images": self.sums["images"], "texts": self.sums["texts"]}
        if "target" in self.sums:
            loop = self.loop
            sim = {k: v.detach().requires_grad_() for k, v in loop.syn.items() if k.startswith("sim_")}
            matrix = full_matrix(loop.sim_kind, sim, len(self.sums["target"]), loop.sim_alpha)
            grads.update(zip(sim, autograd.grad(matrix, list(sim.values()), self.sums["target"])))
        return grads


def _norm(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.square().sum() for t in tensors.values()))


# Relative finite-difference step: eps ||v|| = FD_STEP ||theta_0||. One-sided differences are enough: against a
# float64 tesla reference (shapes-scratch-100 ConvNet, dropout 0.1), float32 fd with 1e-4 is off by 0.4% on the images
# (the float32 tesla mode itself by 2.4%); 1e-3 is truncation-bound (1.4%), below 1e-5 rounding starts to show.
FD_STEP = {torch.float32: 1e-4, torch.float64: 1e-7}
# Under bfloat16 autocast each forward pass rounds the parameters to 8 significant bits, so a shift of 1e-4 of
# their norm mostly vanishes in the rounding; the step is set by that precision instead (tests/test_matching.py
# reports the error of the resulting gradient against float32). Measured on shapes-tiny and shapes-scratch-100, the
# error against the float32 gradient is smallest at 1e-2 (12-16 %; 24-33 % at 3e-3 and 3e-2, 68-90 % at 1e-3), where
# bfloat16 tesla is off by 6-10 %.
FD_STEP_AUTOCAST = 1e-2


def through_frozen_encoder(model, images: torch.Tensor) -> bool:
    """Pixels that a frozen image encoder turns into the features the student reads."""
    return images.dim() == 4 and not model.image_trainable


def encode_frozen(model, syn: dict[str, torch.Tensor], autocast: bool = False, channels_last: bool = False):
    """Pixel space through a frozen image encoder at feature-space cost: (syn with features, pullback) or (syn, None).

    The frozen encoder has no parameter in the student's groups and nothing random happens to the synthetic
    images inside the loop (no augmentation, the encoder in eval mode), so each image's features are the same at
    every inner step and in every pass. Encoding the set once, with its graph kept, lets the inner loop run on
    features (as feature space does); `pullback` sends the features' gradient back to the pixels in one backward
    through the encoder instead of one per step and pass. A trainable encoder or inputs that are already
    features return (syn, None). The pixels go in NHWC layout with `channels_last` or where the encoder prefers
    it (`prefers_channels_last`). Measured on shapes-100 (EfficientNet-Lite0 at 64 px, 50 images, 8 steps, fd,
    1 thread): an iteration costs 2.3-2.4x its feature-space twin with the encoder's batch norms folded (2.7-3.7x
    unfolded, 4.4-4.8x in NCHW), against about 16x when every step encoded its batch; what is left is the
    encoder's one forward and backward pass over the 50 images.
    """
    if not through_frozen_encoder(model, syn["images"]):
        return syn, None
    pixels = syn["images"].detach().requires_grad_()
    nhwc = channels_last or getattr(model.frozen_image_encoder, "prefers_channels_last", False)
    shaped = pixels.contiguous(memory_format=torch.channels_last) if nhwc else pixels
    with torch.enable_grad(), torch.autocast(pixels.device.type, torch.bfloat16, enabled=autocast):
        features = model.image_features(shaped)
    features = features.to(pixels.dtype)

    def pullback(grad: torch.Tensor) -> torch.Tensor:
        return autograd.grad(features, pixels, grad)[0]

    return {**syn, "images": features.detach()}, pullback


def matching_gradient(
    model,
    syn: dict[str, torch.Tensor],
    theta_start: dict[str, torch.Tensor],
    theta_target: dict[str, torch.Tensor],
    plan: InnerPlan,
    *,
    loss_fn,
    sim_kind: str,
    sim_alpha: float = 1.0,
    mode: str = "fd",
    merge_branches: bool = False,
    detach_inner: bool = False,
    autocast: bool = False,
    channels_last: bool = False,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Train N steps on the synthetic set from theta_start, match theta_target; (L, dL/d each entry of `syn`).

    `syn` holds images, texts, the similarity parameters (similarity.py names) and lr_img / lr_txt.
    """
    syn, pullback = encode_frozen(model, syn, autocast, channels_last)
    like = syn["images"]
    theta_start = {m: t.to(like) for m, t in theta_start.items()}
    theta_target = {m: t.to(like) for m, t in theta_target.items()}
    loop = InnerLoop(model, syn, plan, loss_fn, sim_kind, sim_alpha, autocast, channels_last)
    if mode == "unroll":
        loss, grads = _unroll(loop, theta_start, theta_target, merge_branches, detach_inner)
    else:
        loss, grads = _two_pass(loop, theta_start, theta_target, mode, merge_branches)
    if pullback is not None:
        grads["images"] = pullback(grads["images"])
    return loss, grads


def _two_pass(loop: InnerLoop, theta_start, theta_target, mode: str, merge_branches: bool):
    """fd and tesla: pass 1 without graphs, then the replay that differentiates each step's inputs."""
    if mode not in ("fd", "tesla"):
        raise ValueError(f"unknown gradient mode {mode!r}")
    record = mode == "fd"
    theta_n, total, *steps = loop.run(theta_start, record)
    theta_n = {m: t.detach().requires_grad_() for m, t in theta_n.items()}
    loss = matching_loss(theta_n, theta_start, theta_target, merge_branches)
    d_theta_n = dict(zip(theta_n, autograd.grad(loss, list(theta_n.values()))))
    v = {m: -loop.alpha[m] * d for m, d in d_theta_n.items()}  # dL/dg_i, the same for every step
    fd_step = FD_STEP_AUTOCAST if loop.autocast else FD_STEP[theta_start["img"].dtype]
    grads = loop.replay(theta_start, v, tesla=mode == "tesla", fd_step=fd_step, steps=steps[0] if record else None)
    if merge_branches:  # the lrs always follow their own branch's loss (LoRS merges only the data gradient)
        branches = matching_loss(theta_n, theta_start, theta_target, merge_branches=False)
        d_theta_n = dict(zip(theta_n, autograd.grad(branches, list(theta_n.values()))))
    grads.update({LR_KEYS[m]: -(total[m] * d).sum().reshape(loop.alpha[m].shape) for m, d in d_theta_n.items()})
    return loss.item(), grads


def _unroll(loop: InnerLoop, theta_start, theta_target, merge_branches: bool, detach_inner: bool):
    """Autograd through all N steps; with `detach_inner`, g_i sees theta_i as a constant."""
    syn = {k: v.detach().requires_grad_() for k, v in loop.syn.items()}
    alpha = {m: syn[key] for m, key in LR_KEYS.items()}
    theta = {m: t.detach().requires_grad_() for m, t in theta_start.items()}
    for i in range(len(loop.plan.batches)):
        point = {m: t.detach().requires_grad_() for m, t in theta.items()} if detach_inner else theta
        grads = autograd.grad(loop.loss(i, point, loop.inputs(i, syn)), list(point.values()), create_graph=True)
        theta = sgd_step(theta, grads, alpha)
    loss = matching_loss(theta, theta_start, theta_target, merge_branches)
    grads = dict(
        zip(
            syn,
            autograd.grad(
                loss, list(syn.values()), allow_unused=True, materialize_grads=True, retain_graph=merge_branches
            ),
        )
    )
    if merge_branches:  # the lrs follow their own branch's loss, as in the other modes
        lrs = [syn[key] for key in LR_KEYS.values()]
        branches = matching_loss(theta, theta_start, theta_target, merge_branches=False)
        grads.update(zip(LR_KEYS.values(), autograd.grad(branches, lrs)))
    return loss.item(), grads
