"""Stage 4: distil the phases of a preset from expert trajectories (PTM-ST's Algorithm 1 and its ablations).

Every method is this one loop with other switches (config.METHODS): phases or one merged phase, shortcut or
plain expert windows, EMA or none, identity / full / low-rank S, blending, and the gradient mode.

Outputs in OUT, written through `synthetic` (the distilled-set format; README "Use a distilled set"):
- phase-<p>.safetensors: the phase's EMA state (images, texts, similarity parameters, lr_img, lr_txt) and its
  metadata; phase-<p>-images.png beside phase-<p>-initial-images.png, the images it started from (or, for
  features, phase-<p>-nearest-images.png), phase-<p>-captions.json (nearest real caption of each synthetic text,
  and nearest real image of each synthetic image feature);
- meta.json (method, preset, config, seed, encoders, normalisation, iterations and recoveries per phase, version,
  git commit), history.jsonl;
- checkpoints/phase-<p>.pt while a phase runs. All randomness of iteration k of phase p comes from
  generator(seed, "iter", p, k, sample), so `resume` continues bit-identically on CPU from any checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import re
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.optim import SGD

from mmdistill import __version__, distributed
from mmdistill.config import AUTO, PhaseConfig, changed_keys, flat_keys, to_dict
from mmdistill.coresets import random_pairs
from mmdistill.data import whitening
from mmdistill.distill.calibrate import calibrate, expert_epochs_for
from mmdistill.distill.collapse import CollapseWatch, no_move_loss
from mmdistill.distill.matching import LR_KEYS, InnerPlan, matching_gradient
from mmdistill.errors import UserError
from mmdistill.experts.shortcut import matching_pair
from mmdistill.experts.store import ExpertStore
from mmdistill.io import append_jsonl, atomic_path, folder_lock, load_torch, save_torch
from mmdistill.losses import LOSSES
from mmdistill.model import build_model
from mmdistill.prepare import prepare
from mmdistill.similarity import init_similarity
from mmdistill.synthetic import LIVE_LRS, load_phase, phase_metadata, write_captions, write_meta, write_phase
from mmdistill.tracking import log_scalars
from mmdistill.utils import derive_seed, digest, generator, progress_bar, resolve_device

logger = logging.getLogger(__name__)

LR_MIN = 1e-6  # learned student lrs stay above this: a negative lr would train the student backwards
GROUP_OF = {"images": "images", "texts": "texts", "lr_img": "lr", "lr_txt": "lr"}  # else "sim" (sim_* params)
PHASE_OUTPUT = re.compile(
    r"phase-(\d+)(\.safetensors|-images\.png|-initial-images\.png|-nearest-images\.png|-captions\.json)"
)
SNAPSHOT_FILE = re.compile(r"phase-(\d+)-(\d+)\.safetensors")


def plan_phases(cfg) -> list[PhaseConfig]:
    """The phases the method runs: one merged phase without `use_phases`, plain expert windows without
    `use_shortcut`."""
    dc = cfg.distill
    phases = [PhaseConfig(**OmegaConf.to_container(p)) for p in dc.phases]
    if not dc.use_phases:
        ends = [p.shortcut_end for p in phases]
        phases = [
            PhaseConfig(
                pairs=sum(p.pairs for p in phases),
                iterations=sum(p.iterations for p in phases),
                start_epochs=[min(p.start_epochs[0] for p in phases), max(p.start_epochs[1] for p in phases)],
                shortcut_end=None if None in ends else max(ends),
                sim_rank=max((p.sim_rank for p in phases if p.sim_rank is not None), default=None),
            )
        ]
    if not dc.use_shortcut:
        phases = [dataclasses.replace(p, shortcut_end=None) for p in phases]
    return phases


class SyntheticSet:
    """One phase's learnable variables (images, texts, S parameters, student lrs) with their updates and EMA.

    The data (images, texts, S) take SGD steps with momentum at the lrs `data_lrs` (calibrated or configured).
    The learned student lrs take steps on log(lr) with Adam (`lr_update: log-adam`), so one iteration changes an
    lr by about `lr_lr` as a fraction, never more than a few times that: every matching gradient scales with
    the lr, and a plain SGD step on it either overshoots (the next loss explodes) or, once the lr is small,
    can never bring it back. `lr_update: sgd` is the reference's update (SGD with momentum on the lr itself),
    kept above LR_MIN. `gradient_step` remembers the state it started from: the last state whose loss and
    gradients were finite, which `rollback` returns to when a later loss, gradient or update is not.
    """

    def __init__(self, syn: dict[str, torch.Tensor], dc, data_lrs: dict[str, float]):
        self.dc = dc
        self.syn = {k: v.detach().clone().requires_grad_() for k, v in syn.items()}
        self.ema = {k: v.detach().clone() for k, v in syn.items()}
        self.decay = dc.ema_decay if dc.use_ema else 0.0  # decay 0: the "EMA" is the live state
        self.base_lrs = {**data_lrs, "lr": dc.lr_lr}
        groups = {}
        for name, tensor in self.syn.items():
            group = GROUP_OF.get(name, "sim")
            if group != "lr" or dc.lr_update == "sgd":
                groups.setdefault(group, []).append(tensor)
        self.optimizer = SGD(
            [{"params": params, "lr": self.base_lrs[g], "name": g} for g, params in groups.items()],
            momentum=dc.momentum,
        )
        # Adam moments of log(lr) per learned lr, and the step count (log-adam only)
        self.lr_moments = {key: torch.zeros(2, *self.syn[key].shape) for key in LR_KEYS.values()}
        self.lr_steps = 0
        self.iteration, self.lr_factor, self.recoveries = 0, 1.0, []
        self.calibration = None  # the phase's Calibration (its file records how its lrs were chosen)
        self.collapse: dict | None = None  # the CollapseWatch's finding, once the phase has run
        self.good = self.snapshot()

    def snapshot(self) -> dict:
        """Everything a rollback or a resume restores (not the lr factor or the recoveries: they only grow)."""
        return {
            "iteration": self.iteration,
            "syn": {k: v.detach().clone() for k, v in self.syn.items()},
            "ema": {k: v.clone() for k, v in self.ema.items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "lr_moments": {k: v.clone() for k, v in self.lr_moments.items()},
            "lr_steps": self.lr_steps,
        }

    def restore(self, snapshot: dict) -> None:
        self.iteration = snapshot["iteration"]
        with torch.no_grad():
            for k, v in self.syn.items():
                v.copy_(snapshot["syn"][k])
        self.ema = {k: v.clone().to(self.ema[k]) for k, v in snapshot["ema"].items()}
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))  # SGD would alias its buffers
        self.lr_moments = {k: v.clone() for k, v in snapshot["lr_moments"].items()}
        self.lr_steps = snapshot["lr_steps"]
        for group in self.optimizer.param_groups:
            scaled = group["name"] != "lr"  # NaN recovery slows the data, not the learned lrs
            group["lr"] = self.base_lrs[group["name"]] * (self.lr_factor if scaled else 1.0)

    def gradient_step(self, grads: dict[str, torch.Tensor]) -> None:
        """One step on every synthetic variable: SGD on the data, the lr update of `lr_update` on the lrs."""
        self.good = self.snapshot()
        for k, v in self.syn.items():
            v.grad = grads[k].to(v)
        self.optimizer.step()
        with torch.no_grad():
            if self.dc.lr_update == "log-adam":
                self._log_adam_step()
            for key in LR_KEYS.values():
                self.syn[key].clamp_(min=LR_MIN)

    def _log_adam_step(self) -> None:
        """Adam (betas 0.9 / 0.999, eps 1e-8, bias-corrected) on u = log(lr), with dL/du = lr dL/dlr."""
        self.lr_steps += 1
        for key in LR_KEYS.values():
            lr = self.syn[key]
            grad = (lr * lr.grad).cpu()
            moments = self.lr_moments[key]
            moments[0].mul_(0.9).add_(grad, alpha=0.1)
            moments[1].mul_(0.999).addcmul_(grad, grad, value=0.001)
            mean = moments[0] / (1 - 0.9**self.lr_steps)
            spread = (moments[1] / (1 - 0.999**self.lr_steps)).sqrt() + 1e-8
            lr.mul_(torch.exp(-self.dc.lr_lr * mean / spread).to(lr))

    def ema_update(self) -> None:
        """EMA from the initial values, every step, no bias correction (as timm's ModelEmaV2)."""
        for k, v in self.syn.items():
            self.ema[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def finite(self) -> bool:
        return all(torch.isfinite(v).all() for v in self.syn.values())

    def rollback(self, p: int, failed: int) -> None:
        """Back to the last good state with the data lrs halved; a clear error once the retries are spent.

        The error names the keys that can cause the failure: when every try failed at iteration 0, nothing has been
        updated yet, so only the students' initial lr can; else also the lrs of the data this set learns (lr_sim
        only with a learned S).
        """
        if len(self.recoveries) >= self.dc.max_retries:
            if failed == 0 and all(r["iteration"] == 0 for r in self.recoveries):
                hint = "it fails before any update: lower distill.lr_init, the students' initial lr"
            else:
                data = ["distill.lr_images", "distill.lr_texts"]
                data += ["distill.lr_sim"] if any(GROUP_OF.get(k, "sim") == "sim" for k in self.syn) else []
                hint = (
                    f"lower {' / '.join(data)} (halved at each recovery) or distill.lr_init, or raise"
                    " distill.max_retries"
                )
            raise UserError(
                f"phase {p}: loss or gradient not finite at iteration {failed} after"
                f" {self.dc.max_retries} recoveries; {hint}"
            )
        self.lr_factor /= 2
        self.recoveries.append({"iteration": failed, "restart": self.good["iteration"], "lr_factor": self.lr_factor})
        self.restore(self.good)

    def checkpoint(self) -> dict:
        """The current state (finite: the caller checkpoints only after a finished iteration)."""
        return {**self.snapshot(), "lr_factor": self.lr_factor, "recoveries": self.recoveries}

    def load_checkpoint(self, state: dict) -> None:
        self.lr_factor, self.recoveries = state["lr_factor"], state["recoveries"]
        self.restore(state)
        self.good = self.snapshot()


class Distiller:
    """The student (built once), the experts and the real data, shared by every phase."""

    def __init__(self, cfg, store, bundle, device: torch.device, keys: dict | None = None):
        """`keys`: the distill-determining keys that mark this run's files (those of the config as given, before
        its auto settings were resolved); by default those of `cfg`."""
        self.cfg, self.store, self.bundle, self.device = cfg, store, bundle, device
        self.config_keys = keys or distill_keys(cfg)
        self.fingerprint = digest(self.config_keys)
        self.model = build_model(
            cfg.model,
            text_dim=bundle.text_dim,
            image_size=cfg.data.image_size,
            seed=derive_seed(cfg.seed, "student"),
            device=device,
        ).train()
        if store.layouts != self.model.layouts:
            raise UserError(
                f"the experts in {store.folder} were trained for another student than this config's"
                f" ({cfg.model.image_encoder}, image_trainable={cfg.model.image_trainable}); train"
                " experts with the same preset and model settings"
            )
        dc = cfg.distill
        self.blend = dc.blend.alpha if dc.blend.enabled else None
        self.crop = dc.augment == "crop"
        self.options = {
            "loss_fn": LOSSES[dc.loss],
            "sim_kind": dc.similarity,
            "sim_alpha": dc.sim_alpha,
            "mode": dc.gradient,
            "merge_branches": dc.merge_loss_branches,
            "autocast": dc.autocast,
            "channels_last": dc.channels_last,
        }

    def init_synthetic(self, p: int, phase: PhaseConfig) -> dict[str, torch.Tensor]:
        """`pairs` random real caption entries (each with its image), or Gaussian noise; S = I; lrs = lr_init
        (a placeholder until the phase's calibration sets it)."""
        dc, gen = self.cfg.distill, generator(self.cfg.seed, "init", p)
        captions = random_pairs(len(self.bundle.splits["train"].captions), phase.pairs, gen)
        images, texts = self.bundle.pairs("train", captions, dc.space, self.cfg.data.image_size)
        if dc.init == "noise":
            images = torch.randn(images.shape, generator=gen)
            texts = torch.randn(texts.shape, generator=gen)
        lr = torch.tensor([dc.lr_init if dc.lr_init != AUTO else 0.0])
        rank = dc.sim_rank if phase.sim_rank is None else phase.sim_rank
        syn = {
            "images": images,
            "texts": texts,
            **init_similarity(dc.similarity, phase.pairs, rank, gen),
            "lr_img": lr,
            "lr_txt": lr.clone(),
        }
        return {k: v.float().to(self.device) for k, v in syn.items()}

    def sample_start_epoch(self, p: int, phase: PhaseConfig, sample: int, gen: torch.Generator) -> tuple[int, int]:
        """The next expert of a seeded shuffle (a new shuffle per pass over the experts), start s ~ U[min, max)."""
        cycle, position = divmod(sample, len(self.store))
        order = torch.randperm(len(self.store), generator=generator(self.cfg.seed, "experts", p, cycle))
        low, high = phase.start_epochs
        return int(order[position]), int(torch.randint(low, high, (1,), generator=gen))

    def iteration(self, state: SyntheticSet, p: int, phase: PhaseConfig) -> float | None:
        """Algorithm 1, lines 6-10, on `trajectories_per_iter` samples (split over the ranks, gradients averaged).
        None when the loss, a gradient or the update is not finite: the caller rolls back."""
        dc, k = self.cfg.distill, state.iteration
        share = distributed.world_size() / dc.trajectories_per_iter  # each rank's sum * share, then mean over ranks
        loss, grads = torch.zeros((), device=self.device), {n: torch.zeros_like(v) for n, v in state.syn.items()}
        for sample in distributed.shard(range(dc.trajectories_per_iter)):
            gen = generator(self.cfg.seed, "iter", p, k, sample)
            # sample start epoch
            expert, start = self.sample_start_epoch(p, phase, k * dc.trajectories_per_iter + sample, gen)
            theta_start, theta_target = matching_pair(
                self.store, expert, start, dc.expert_epochs, phase.shortcut_end, self.device
            )
            # train t steps on the synthetic set, matching loss, and its gradient w.r.t. the synthetic set
            plan = InnerPlan.draw(
                phase.pairs, dc.syn_steps, dc.mini_batch_size, gen, self.blend, self.device, crop=self.crop
            )
            value, grad = matching_gradient(self.model, state.syn, theta_start, theta_target, plan, **self.options)
            loss += value * share
            for name, g in grad.items():
                grads[name] += g * share
        distributed.all_reduce_mean([loss, *grads.values()])
        if not (torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())):
            return None
        # gradient step
        state.gradient_step(grads)
        # EMA
        state.ema_update()
        state.iteration += 1
        return loss.item() if state.finite() else None

    def run_phase(
        self, p: int, phase: PhaseConfig, out: Path, resume: bool, previous_lr_init: float | None = None
    ) -> SyntheticSet:
        """Phase p from its calibration to its last iteration; `previous_lr_init`: phase p - 1's lr_init."""
        dc, main = self.cfg.distill, distributed.is_main()
        syn = self.init_synthetic(p, phase)
        calibration = calibrate(self, p, phase, syn, previous_lr_init)
        syn["lr_img"] = syn["lr_txt"] = torch.full_like(syn["lr_img"], calibration.lr_init)
        state = SyntheticSet(syn, dc, calibration.data_lrs())
        state.calibration = calibration
        checkpoint = out / "checkpoints" / f"phase-{p}.pt"
        if resume and checkpoint.exists():
            state.load_checkpoint(_load_checkpoint(checkpoint, state))
        watch = CollapseWatch(no_move_loss(dc), calibration.lr_init, phase.iterations)
        if main:  # the rank that writes the history and the phase file keeps the watch
            checkpoint.parent.mkdir(exist_ok=True)
            for record in _trim_history(out / "history.jsonl", p, state.iteration):
                watch.update(record["loss"], (record["lr_img"], record["lr_txt"]), record["iteration"])
            for key, reason in calibration.reasons.items():
                logger.info("phase %d: %s = %.4g (%s)", p, key, getattr(calibration, key), reason)
            if state.iteration == 0:
                append_jsonl(
                    out / "history.jsonl", {"phase": p, "iteration": 0, "event": "calibration", **calibration.to_json()}
                )
        bar = progress_bar(total=phase.iterations, initial=state.iteration, desc=f"phase {p}", disable=not main)
        while state.iteration < phase.iterations:
            k, started = state.iteration, time.perf_counter()
            loss = self.iteration(state, p, phase)
            seconds = time.perf_counter() - started
            if loss is None:
                state.rollback(p, k)
                bar.n = state.iteration
                if main:
                    bar.write(
                        f"phase {p} iteration {k}: not finite; back to iteration {state.iteration},"
                        f" data lrs x{state.lr_factor:g}"
                    )
                    append_jsonl(out / "history.jsonl", {"phase": p, "event": "recovery", **state.recoveries[-1]})
                continue
            lr_img, lr_txt = (state.syn[key].item() for key in LR_KEYS.values())
            was_collapsed = watch.collapse
            verdict = watch.update(loss, (lr_img, lr_txt), k)
            if main:
                append_jsonl(
                    out / "history.jsonl",
                    {
                        "phase": p,
                        "iteration": k,
                        "loss": loss,
                        "lr_img": lr_img,
                        "lr_txt": lr_txt,
                        "seconds": round(seconds, 4),
                    },
                )
                log_scalars(f"distill/{dc.method}/phase-{p}", {"loss": loss, "lr_img": lr_img, "lr_txt": lr_txt}, k)
                if verdict == "collapsed":
                    bar.write(f"phase {p}: COLLAPSED at iteration {k}: {watch.collapse['reason']}")
                    append_jsonl(out / "history.jsonl", {"phase": p, "event": "collapse", **watch.collapse})
                elif verdict == "recovered":
                    bar.write(f"phase {p}: learning again at iteration {k} (loss {loss:.4f}): no longer collapsed")
                    append_jsonl(
                        out / "history.jsonl",
                        {"phase": p, "event": "collapse-ended", "iteration": k, "since": was_collapsed["iteration"]},
                    )
                if dc.snapshot_every and state.iteration % dc.snapshot_every == 0:
                    self.save_ema(phase, state, out / "snapshots" / f"phase-{p}-{state.iteration}.safetensors")
                if state.iteration % dc.checkpoint_every == 0 and state.iteration < phase.iterations:
                    save_torch(
                        {**state.checkpoint(), "fingerprint": self.fingerprint, "config_keys": self.config_keys},
                        checkpoint,
                    )
            bar.set_postfix(
                loss=f"{loss:.4f}",
                s_it=f"{seconds:.2f}",
                lr_img=f"{lr_img:.4f}",
                lr_txt=f"{lr_txt:.4f}",
                **({"status": "COLLAPSED"} if watch.collapse else {}),
            )
            bar.update(1)
        bar.close()
        state.collapse = watch.collapse
        return state

    def save_phase(self, p: int, phase: PhaseConfig, state: SyntheticSet, out: Path) -> None:
        """The EMA state and its views; the safetensors file comes last: it marks the phase as done."""
        ema = {k: v.detach().cpu() for k, v in state.ema.items()}
        nearest = _nearest_captions(ema["texts"], self.bundle)
        if ema["images"].dim() == 4:
            _save_grid(ema["images"], self.bundle, out / f"phase-{p}-images.png")
            initial = self.init_synthetic(p, phase)["images"].cpu()  # deterministic: the set the phase began from
            _save_grid(initial, self.bundle, out / f"phase-{p}-initial-images.png")
        else:
            # a feature vector is no picture: its nearest real image stands in for it in the grid and the export
            similarity, image_ids = _cosine_nearest(ema["images"], self.bundle.features["train"])
            _save_nearest_grid(image_ids, self.bundle, self.cfg.data.image_size, out / f"phase-{p}-nearest-images.png")
            for record, s, i in zip(nearest, similarity.tolist(), image_ids.tolist()):
                record.update(image_id=i, image_similarity=round(s, 4))
        write_captions(nearest, out / f"phase-{p}-captions.json")
        self.save_ema(phase, state, out / f"phase-{p}.safetensors")

    def save_ema(self, phase: PhaseConfig, state: SyntheticSet, path: Path) -> None:
        """The EMA state as a phase file (also used for the intermediate snapshots of the recall curve)."""
        dc = self.cfg.distill
        metadata = {
            "similarity": dc.similarity,
            "sim_alpha": float(dc.sim_alpha),
            "space": dc.space,
            "pairs": phase.pairs,
            "iterations": state.iteration,
            "image_size": self.cfg.data.image_size,
            "lr_source": "ema",
            "recoveries": state.recoveries,
            "fingerprint": self.fingerprint,
            "config_keys": self.config_keys,
            "calibration": state.calibration.to_json(),
            "collapse": state.collapse,
        }
        live = {LIVE_LRS[key]: state.syn[key].detach() for key in LR_KEYS.values()}  # the reference evaluates with them
        write_phase(path, {**state.ema, **live}, metadata)


def distill(cfg, experts_dir: Path, out_dir: Path, resume: bool = False, restart: bool = False) -> None:
    """Distil every phase of `cfg` into `out_dir`; with `resume`, finished phases are kept and a running phase
    continues from its checkpoint (refused when they were made with other distill-determining keys); with
    `restart`, whatever an earlier distillation left in `out_dir` is discarded."""

    out = Path(out_dir)
    with distributed.process_group(cfg.device), contextlib.ExitStack() as held:
        store = ExpertStore(experts_dir)
        phases = plan_phases(cfg)
        with distributed.main_first():  # rank 0 builds the feature cache and owns the output folder
            bundle = prepare(cfg, verbose=distributed.is_main())
            keys = distill_keys(cfg)  # of the config as given: its auto settings are resolved below
            key = digest(keys)
            if distributed.is_main():
                held.enter_context(folder_lock(out))
                if not restart:
                    _check_earlier_run(out, len(phases), key, keys, resume)
                _clear_stale(out, len(phases), key, resume and not restart)
        cfg, expert_epochs = resolve_expert_epochs(cfg, bundle)
        if distributed.is_main():
            logger.info("expert_epochs = %d (%s)", expert_epochs["value"], expert_epochs["reason"])
        needed = max(max(p.start_epochs[1] - 1 + expert_epochs["value"], p.shortcut_end or 0) for p in phases)
        if needed > store.epochs:
            raise UserError(
                f"the phases need expert snapshot {needed}, but the experts in {experts_dir} have"
                f" epochs 0..{store.epochs}"
            )
        distiller = Distiller(cfg, store, bundle, resolve_device(cfg.device), keys)
        previous_lr_init = None  # the next phase's calibration may start from it
        for p, phase in enumerate(phases):
            done = out / f"phase-{p}.safetensors"
            if resume and not restart and done.exists():  # checked: this config's
                previous_lr_init = phase_metadata(done)["calibration"]["lr_init"]
                continue
            state = distiller.run_phase(p, phase, out, resume and not restart, previous_lr_init)
            previous_lr_init = state.calibration.lr_init
            if distributed.is_main():
                distiller.save_phase(p, phase, state, out)
                (out / "checkpoints" / f"phase-{p}.pt").unlink(missing_ok=True)
            distributed.barrier()
        if distributed.is_main():
            _write_meta(cfg, bundle, phases, out, key, expert_epochs)  # last: it marks the distillation as finished


def resolve_expert_epochs(cfg, bundle) -> tuple[DictConfig, dict]:
    """A copy of `cfg` with distill.expert_epochs resolved (calibrate.expert_epochs_for), and {value, reason}."""
    value, reason = expert_epochs_for(cfg, plan_phases(cfg), len(bundle.splits["train"].captions))
    return OmegaConf.merge(cfg, {"distill": {"expert_epochs": value}}), {"value": value, "reason": reason}


# Keys that do not change the distilled data: names, where it runs, how often it saves, how many failures it
# tolerates and how the result is evaluated. A resume after changing one of them continues where it stopped.
# `methods.*` is the other methods' settings (this method's are already applied to distill.*).
NOT_DISTILL_KEYS = (
    "name",
    "description",
    "inherit",
    "device",
    "cache_dir",
    "evaluate",
    "methods",
    "distill.checkpoint_every",
    "distill.snapshot_every",
    "distill.max_retries",
)


def distill_keys(cfg) -> dict:
    """The dotted config keys that determine the distilled data, with their values: a checkpoint or phase file
    is reused only under the same ones (their digest marks the files), and a refused resume lists those that
    differ."""
    return {
        k: v
        for k, v in flat_keys(to_dict(cfg)).items()
        if not any(k == skip or k.startswith(skip + ".") for skip in NOT_DISTILL_KEYS)
    }


def _check_earlier_run(out: Path, count: int, key: str, keys: dict, resume: bool) -> None:
    """Refuse to throw away an earlier distillation in `out` without being told to (`restart`).

    Without `resume`, an unfinished one (a checkpoint, or phase files without meta.json) is refused. With it,
    every checkpoint and phase file must come from the same distill-determining keys; the error lists those that
    differ. A finished run without `resume` is overwritten: that is what distilling into its folder asks for."""
    checkpoints = sorted((out / "checkpoints").glob("phase-*.pt"))
    phases = [out / f"phase-{p}.safetensors" for p in range(count) if (out / f"phase-{p}.safetensors").exists()]
    if not resume:
        if checkpoints or (phases and not (out / "meta.json").exists()):
            raise UserError(
                f"{out} holds an unfinished distillation; continue it with --resume, or discard it with --restart"
            )
        return
    for path in checkpoints:
        saved = load_torch(path, "checkpoint")
        if isinstance(saved, dict) and saved.get("fingerprint") not in (key, None):
            raise _resume_refused(path, saved.get("config_keys"), keys)
    for path in phases:
        saved = phase_metadata(path)
        if saved.get("fingerprint") != key:
            raise _resume_refused(path, saved.get("config_keys"), keys)


def _resume_refused(path: Path, saved_keys: dict | None, keys: dict) -> UserError:
    differ = changed_keys(saved_keys, keys) if isinstance(saved_keys, dict) else "not recorded in this older file"
    return UserError(
        f"cannot resume: {path} was distilled with other settings ({differ}); undo the change, or"
        " start over with --restart"
    )


def _load_checkpoint(path: Path, state: SyntheticSet) -> dict:
    """The checkpoint (`_check_earlier_run` has matched its fingerprint), with every entry `state.load_checkpoint`
    reads, its tensors finite and shaped like `state`'s."""
    saved = load_torch(path, "checkpoint")
    try:
        tensors = [v for part in ("syn", "ema") for v in saved[part].values()]
        complete = {"iteration", "optimizer", "lr_factor", "recoveries", "fingerprint"} <= set(saved)
        shapes_match = all(
            set(saved[part]) == set(state.syn)
            and all(torch.is_tensor(v) and v.shape == state.syn[k].shape for k, v in saved[part].items())
            for part in ("syn", "ema")
        )
    except (TypeError, KeyError, AttributeError):
        complete = shapes_match = False
    if not (complete and shapes_match):
        raise UserError(f"checkpoint {path} does not hold this phase's state; delete it to restart the phase")
    if not all(torch.isfinite(v).all() for v in tensors):
        raise UserError(f"checkpoint {path} holds NaN or Inf values; delete it to restart the phase")
    return saved


def _clear_stale(out: Path, count: int, expected: str, resume: bool) -> None:
    """Remove what a later command could take for this run's output: without `resume` every earlier output;
    with it, the phases (and snapshots) of another config or beyond this run's `count`. A damaged phase file of
    this config is refused (load_phase), not silently redone."""
    keep = set()
    if resume:
        keep = {
            p
            for p in range(count)
            if (out / f"phase-{p}.safetensors").exists()
            and load_phase(out / f"phase-{p}.safetensors").get("fingerprint") == expected
        }
    for path in out.glob("phase-*"):
        match = PHASE_OUTPUT.fullmatch(path.name)
        if match and int(match.group(1)) not in keep:
            path.unlink()
    for path in (out / "snapshots").glob("phase-*-*.safetensors"):
        match = SNAPSHOT_FILE.fullmatch(path.name)
        if match and not (
            resume and int(match.group(1)) < count and phase_metadata(path).get("fingerprint") == expected
        ):
            path.unlink()
    stale = [out / "recall_curve.json", out / whitening.FILE]  # the whitening is written again beside meta.json
    stale += [] if resume else [out / "meta.json", *out.glob("checkpoints/phase-*.pt")]
    for path in stale:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- outputs


def _save_grid(images: torch.Tensor, bundle, path: Path) -> None:
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(bundle.pictures(images), tmp, nrow=10, format="png")


def _cosine_nearest(queries: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, index) of the most similar row of `real` for each query, 256 queries at a time."""
    real = F.normalize(real.float(), dim=1)
    best = [(chunk @ real.T).max(dim=1) for chunk in F.normalize(queries.float(), dim=1).split(256)]
    return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])


def _save_nearest_grid(image_ids: torch.Tensor, bundle, image_size: int, path: Path) -> None:
    """Feature-space phases have no pixels to show: the most cosine-similar real training image of each one."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(bundle.pixels01("train", image_ids, image_size), tmp, nrow=10, format="png")


def _nearest_captions(texts: torch.Tensor, bundle) -> list[dict]:
    """For each synthetic text, the most cosine-similar real training caption."""
    captions = bundle.splits["train"].captions
    best, index = _cosine_nearest(texts, bundle.texts["train"])
    return [
        {"caption": captions[i], "caption_id": i, "similarity": round(s, 4)}
        for s, i in zip(best.tolist(), index.tolist())
    ]


def _trim_history(path: Path, p: int, iteration: int) -> list[dict]:
    """Drop history lines from phase p's iteration `iteration` on (a resumed run writes them again); return
    phase p's iteration records that stay (events excluded), for the collapse watch to replay."""
    if not path.exists():
        return []
    keep = [
        (line, r)
        for line in path.read_text().splitlines()
        if (r := json.loads(line))["phase"] < p or (r["phase"] == p and r["iteration"] < iteration)
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line, _ in keep))
    return [r for _, r in keep if r["phase"] == p and "loss" in r]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _write_meta(cfg, bundle, phases: list[PhaseConfig], out: Path, key: str, expert_epochs: dict) -> None:
    """meta.json once every phase is written: what load_synthetic checks the phase files against. `key`: the
    fingerprint of the config as given (the phase files carry it); `cfg` has its auto settings resolved.
    The encoders and the pixel normalisation are written out so the set can be used without the config."""
    done = [phase_metadata(out / f"phase-{p}.safetensors") for p in range(len(phases))]
    normalization = {"mean": list(bundle.mean), "std": list(bundle.std)}
    if bundle.whitening is not None:  # the images are whitened pixels: the transform travels with them
        bundle.whitening.save(out / whitening.FILE)
        normalization["whitening"] = whitening.FILE
    write_meta(
        {
            "method": cfg.distill.method,
            "preset": cfg.name,
            "seed": cfg.seed,
            "config": to_dict(cfg),
            "fingerprint": key,
            "planned_phases": len(phases),
            "phases": [
                {
                    **dataclasses.asdict(phase),
                    "iterations_done": d["iterations"],
                    "recoveries": d["recoveries"],
                    "calibration": d.get("calibration"),
                    "collapse": d.get("collapse"),
                }
                for phase, d in zip(phases, done)
            ],
            "encoders": {"image": cfg.model.image_encoder, "text": cfg.model.text_encoder, "text_dim": bundle.text_dim},
            "normalization": normalization,
            "expert_epochs": expert_epochs,
            "lr_source": "ema",
            "version": __version__,
            "git_commit": _git_commit(),
            "world_size": distributed.world_size(),
        },
        out,
    )
