"""Shared fixtures: small synthetic slides made by the project's own generator (never downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Six 2048x1536 slides at 0.5 µm/px (generic TIFF and Aperio SVS), labels.csv, ground-truth masks."""
    from pipeline.synthetic import make_cohort

    d = tmp_path_factory.mktemp("cohort")
    make_cohort(d, n=6, width=2048, height=1536, mpp=0.5, seed=1)
    return d


@pytest.fixture(scope="session")
def env_with_venv() -> dict[str, str]:
    """Environment whose PATH starts with this interpreter's bin dir (for snakemake subprocesses)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small MIL models train faster and deterministically on one intra-op thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
