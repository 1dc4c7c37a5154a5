"""Shared fixtures: the real Shakespeare corpus (fetched once into data/) and a tokenizer trained on it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import fetch_shakespeare, shakespeare_split  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    return fetch_shakespeare(ROOT / "data")


@pytest.fixture(scope="session")
def small_tokenizer(shakespeare_dir) -> Tokenizer:
    """A 512-token BPE trained on a few plays: quick to train, real merges."""
    train, _ = shakespeare_split(shakespeare_dir)
    return Tokenizer.train(files=train[:4], vocab_size=512, show_progress=False)


@pytest.fixture(scope="session")
def tok_path(small_tokenizer, tmp_path_factory) -> Path:
    """small_tokenizer saved as a tokenizer.json, for the scripts' --tokenizer flag."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    small_tokenizer.save(path)
    return path


@pytest.fixture
def machine():
    """machine.MACHINE for one test: pin choices with machine.pin("name=value"); they are restored after."""
    from machine import MACHINE

    MACHINE.read_environment()
    saved = dict(MACHINE.values), dict(MACHINE.how)
    yield MACHINE
    MACHINE.values, MACHINE.how = saved


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; deselected, with the reason printed, where none is")
    # As every entry point does first. Above all, Inductor's cache folder for this ATEN_CPU_CAPABILITY, before any
    # test compiles: Inductor would otherwise take its default folder, shared by capped and uncapped runs.
    # Training in tests runs fp32 and uncompiled unless a test says otherwise (flags win over the pin): timing
    # the candidates compiles each, so test_train.py times them once, on purpose. Subprocesses inherit the pin.
    import os

    from machine import ENV, prepare_process
    os.environ[ENV] = ",".join(filter(None, ["train_step=fp32", os.environ.get(ENV)]))
    prepare_process()


def pytest_collection_modifyitems(config, items):
    """The gpu tests run where a GPU is visible and must pass there; elsewhere they are deselected (not skipped:
    the CPU suite never skips), and the run says so."""
    import torch

    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu and not torch.cuda.is_available():
        items[:] = [item for item in items if "gpu" not in item.keywords]
        config.hook.pytest_deselected(items=gpu)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{len(gpu)} gpu tests deselected: no CUDA GPU is visible here")
