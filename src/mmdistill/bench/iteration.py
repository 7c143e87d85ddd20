"""`bench iteration`: seconds per distillation iteration against plain training steps, and its memory."""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmdistill.bench.models import build_bench_model
from mmdistill.config import AUTO, from_dict, to_dict
from mmdistill.distill.calibrate import DATA_KEYS
from mmdistill.distill.engine import SyntheticSet
from mmdistill.distill.matching import InnerPlan, matching_gradient
from mmdistill.losses import LOSSES
from mmdistill.similarity import init_similarity
from mmdistill.utils import resolve_device

logger = logging.getLogger(__name__)


def _bench_setup(cfg, syn_steps: int):
    """The preset's student (random init) and first phase on random tensors, with a fake 2-snapshot target.

    Returns (iteration(mode), plain(), device): a distillation iteration (matching gradient, gradient step, EMA;
    the synthetic set is put back afterwards, so every call does the same work) and syn_steps plain training
    steps of the same student on mini-batches of the same size."""

    cfg = OmegaConf.merge(cfg, {"distill": {"syn_steps": syn_steps}})
    dc, pairs, device = cfg.distill, cfg.distill.phases[0].pairs, resolve_device(cfg.device)
    model = build_bench_model(cfg).to(device).train()
    if not model.image_trainable:
        model.frozen_image_encoder.to(device)
    gen = torch.Generator().manual_seed(0)
    if dc.space == "pixel":
        images = torch.randn(pairs, 3, cfg.data.image_size, cfg.data.image_size, generator=gen)
    else:
        images = torch.randn(pairs, model.frozen_image_encoder.out_dim, generator=gen)
    lr = torch.tensor([_nominal(dc.lr_init, 0.01)])
    syn = {
        "images": images,
        "texts": torch.randn(pairs, model.text_projection.projection.in_features, generator=gen),
        **init_similarity(dc.similarity, pairs, dc.sim_rank, gen),
        "lr_img": lr,
        "lr_txt": lr.clone(),
    }
    data_lrs = {group: _nominal(dc[key], 1.0) for group, key in DATA_KEYS.items()}  # speed does not depend on them
    state = SyntheticSet({k: v.to(device) for k, v in syn.items()}, dc, data_lrs)
    initial = state.snapshot()
    theta_start = model.get_flat()
    theta_target = {g: t + 0.01 * torch.randn(t.shape, generator=gen).to(t) for g, t in theta_start.items()}
    plan = InnerPlan.draw(
        pairs,
        syn_steps,
        dc.mini_batch_size,
        gen,
        dc.blend.alpha if dc.blend.enabled else None,
        device,
        crop=dc.augment == "crop",
    )

    def iteration(mode: str) -> None:
        _, grads = matching_gradient(
            model,
            state.syn,
            theta_start,
            theta_target,
            plan,
            loss_fn=LOSSES[dc.loss],
            sim_kind=dc.similarity,
            sim_alpha=dc.sim_alpha,
            mode=mode,
            autocast=dc.autocast,
            channels_last=dc.channels_last,
        )
        state.gradient_step(grads)
        state.ema_update()
        state.restore(initial)

    layout = torch.channels_last if dc.channels_last and dc.space == "pixel" else torch.contiguous_format

    def plain() -> None:
        theta = theta_start
        for index in plan.batches:
            point = {g: t.detach().requires_grad_() for g, t in theta.items()}
            images = state.syn["images"][index].detach().contiguous(memory_format=layout)
            with torch.autocast(device.type, torch.bfloat16, enabled=dc.autocast):
                logits = model.logits_at(point, images, state.syn["texts"][index].detach()).float()
            grads = torch.autograd.grad(
                LOSSES[dc.loss](logits, torch.eye(len(index), device=device)), list(point.values())
            )
            theta = {g: point[g].detach() - 0.1 * grad for g, grad in zip(point, grads)}

    return iteration, plain, device


def _nominal(value, fallback: float) -> float:
    """A configured lr, or `fallback` where it is auto (the benchmark has no experts to calibrate on)."""
    return fallback if value == AUTO else float(value)


def _memory_probe(raw_cfg: dict, syn_steps: int, mode: str) -> float:
    """Peak memory (MiB) of one iteration above the memory in use just before it (no warm-up: the first
    iteration's one-time allocations count at every syn_steps alike, and on a large model a warm-up doubles
    the cost of the sweep).

    CUDA: max_memory_allocated. CPU (a fresh process, see _memory_growth): the kernel's peak-RSS mark (VmHWM)
    is reset to the current RSS (clear_refs) right before the iteration."""
    iteration, _, device = _bench_setup(from_dict(raw_cfg), syn_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        iteration(mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    iteration(mode)
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(field: str, path: str = "/proc/self/status") -> int:
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def _free_memory_mib(device: torch.device) -> float:
    """Memory a probe may still take: free GPU memory on CUDA, else the system's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return _proc_status_kib("MemAvailable", "/proc/meminfo") / 1024


def _time_mode(
    raw_cfg: dict, mode: str, budget_s: float, max_repeats: int, threads: int, against: str = "plain"
) -> dict:
    """Run in a fresh process by bench_iteration: one warm-up, then iterations of `mode` interleaved with a
    baseline until `budget_s` has passed (at least one pair, at most max_repeats); medians of wall and CPU
    seconds, and this process's peak RSS: the mode's own, nothing else ran here (unless `against` is feature).

    The baseline (`against`): syn_steps plain training steps of the same student, or (feature) the same
    iteration in feature space, for pixels through a frozen encoder: what encoding them costs."""
    torch.set_num_threads(threads)
    cfg = from_dict(raw_cfg)
    iteration, baseline, device = _bench_setup(cfg, cfg.distill.syn_steps)
    if against == "feature":
        in_features, _, _ = _bench_setup(OmegaConf.merge(cfg, {"distill": {"space": "feature"}}), cfg.distill.syn_steps)
        baseline = functools.partial(in_features, mode)
    runs = {"plain": baseline, mode: lambda: iteration(mode)}
    started = time.perf_counter()
    for run in runs.values():  # warm-up
        run()
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    budget_end = time.perf_counter() + max(0.0, budget_s - (time.perf_counter() - started))
    while not wall["plain"] or (len(wall["plain"]) < max_repeats and time.perf_counter() < budget_end):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
    out = {
        "seconds": statistics.median(wall[mode]),
        "seconds_plain": statistics.median(wall["plain"]),
        "cpu_seconds": statistics.median(cpu[mode]),
        "cpu_seconds_plain": statistics.median(cpu["plain"]),
        "repeats": len(wall[mode]),
        "peak_rss_gib": _proc_status_kib("VmHWM") / 2**20,
    }
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


_FRESH = (
    "import json, sys; from mmdistill.bench import iteration as distill; "
    "print(json.dumps(getattr(distill, sys.argv[1])(*json.loads(sys.argv[2]))))"
)


def _in_fresh_process(function: str, *args, env: dict | None = None):
    """distill.<function>(*args) in a new Python process (JSON in, JSON out): its memory is its own."""
    result = subprocess.run(
        [sys.executable, "-c", _FRESH, function, json.dumps(args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench subprocess {function} failed:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def _memory_growth(cfg, syn_steps: int, mode: str) -> float:
    """On CPU in a fresh process whose malloc returns big blocks to the system at once (fixed mmap threshold),
    so that its RSS follows the tensors alive."""
    if resolve_device(cfg.device).type == "cuda":
        return _memory_probe(to_dict(cfg), syn_steps, mode)
    return _in_fresh_process("_memory_probe", to_dict(cfg), syn_steps, mode, env={"MALLOC_MMAP_THRESHOLD_": "65536"})


def bench_iteration(cfg, budget_s: float = 30.0, max_repeats: int = 5) -> dict:
    """Seconds per distillation iteration of the default gradient mode and of tesla, each against syn_steps
    plain training steps of the same student measured interleaved with it (medians, wall and CPU time), each
    in a fresh process whose peak RSS (`peak_rss_gib`) is that mode's alone; for pixels through a frozen
    encoder, the default mode against its own iteration in feature space (`ratio_pixel_vs_feature`); then the
    memory growth of one iteration at syn_steps 5 vs 20 (default mode; unroll, whose growth is linear, only
    where 20 steps of it fit in a quarter of the free memory: on NFNet-L0 at 64 px it grew 5.5 GiB over 5
    steps, about 21 GiB at 20). `budget_s` bounds the timed repeats of each mode (at least one): a large model
    gets fewer repeats, not a longer benchmark. The machine's 1-minute load before and after is recorded
    beside the threads and cores (a warning says when other jobs leave this one fewer cores than threads)."""
    dc = cfg.distill
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]  # the 1-minute load before this benchmark: the other jobs it shares the CPUs with
    if load + threads > cores + 0.5:
        logger.warning(
            "the machine is busy (load %.1f on %d cores, this benchmark adds %d threads): OpenMP threads wait on"
            " each other when one is descheduled, so the seconds are slow and noisy; the ratios, measured side by"
            " side, hold better. Run it alone, or with OMP_NUM_THREADS at the cores left free",
            load,
            cores,
            threads,
        )
    result = {
        "device": str(resolve_device(cfg.device)),
        "threads": threads,
        "cores": cores,
        "load_before": round(load, 2),
        "gradient": dc.gradient,
        "syn_steps": dc.syn_steps,
        "mini_batch_size": dc.mini_batch_size,
        "pairs": dc.phases[0].pairs,
    }
    for mode in dict.fromkeys((dc.gradient, "tesla")):
        timed = _in_fresh_process("_time_mode", to_dict(cfg), mode, budget_s, max_repeats, threads)
        suffix = "" if mode == dc.gradient else f"_{mode}"
        result.update(
            {
                f"seconds_per_iteration{suffix}": timed["seconds"],
                f"seconds_plain_steps{suffix}": timed["seconds_plain"],
                f"cpu_seconds_per_iteration{suffix}": timed["cpu_seconds"],  # what a loaded machine still shows
                f"ratio{suffix}": timed["seconds"] / timed["seconds_plain"],
                f"ratio_cpu{suffix}": timed["cpu_seconds"] / timed["cpu_seconds_plain"],
                f"repeats{suffix}": timed["repeats"],
                f"peak_rss_gib{suffix}": timed["peak_rss_gib"],
            }
        )
        if "peak_cuda_gib" in timed:
            result[f"peak_cuda_gib{suffix}"] = timed["peak_cuda_gib"]
    if dc.space == "pixel" and not cfg.model.image_trainable:
        timed = _in_fresh_process("_time_mode", to_dict(cfg), dc.gradient, budget_s, max_repeats, threads, "feature")
        result["seconds_per_iteration_feature_space"] = timed["seconds_plain"]
        result["ratio_pixel_vs_feature"] = timed["seconds"] / timed["seconds_plain"]
    for mode in (dc.gradient, "unroll"):
        suffix = "" if mode == dc.gradient else f"_{mode}"
        growth = {5: _memory_growth(cfg, 5, mode)}
        result[f"peak_memory_mib_5{suffix}"] = growth[5]
        if mode == "unroll" and 4 * growth[5] > _free_memory_mib(resolve_device(cfg.device)) / 4:
            result[f"peak_memory_mib_20{suffix}"] = f"skipped: about {4 * growth[5] / 1024:.1f} GiB expected"
            continue
        growth[20] = _memory_growth(cfg, 20, mode)
        result[f"peak_memory_mib_20{suffix}"] = growth[20]
        result[f"memory_ratio_20_vs_5{suffix}"] = growth[20] / max(growth[5], 1e-9)
    result["load_after"] = round(os.getloadavg()[0], 2)
    return result
