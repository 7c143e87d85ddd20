"""Shared test setup: offline hubs, one torch thread (small tensors; no oversubscription next to subprocesses)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Float results depend on the intra-op thread count; torchrun ranks run with one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained_indices(monkeypatch) -> list[int]:
    """The index of every expert trained from here on, in order (the training itself still runs)."""
    import mmdistill.experts.train as experts_module

    trained, real_train_expert = [], experts_module.train_expert

    def counting_train_expert(cfg, bundle, index, *args):
        trained.append(index)
        real_train_expert(cfg, bundle, index, *args)

    monkeypatch.setattr(experts_module, "train_expert", counting_train_expert)
    return trained


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """shapes-tiny experts (2 experts x 3 epochs) and the overrides that point at their feature cache."""
    from mmdistill.config import load_config
    from mmdistill.experts.train import train_experts

    root = tmp_path_factory.mktemp("tiny")
    overrides = [f"cache_dir={root / 'cache'}"]
    train_experts(load_config("shapes-tiny", overrides), root / "experts")
    return root, overrides
