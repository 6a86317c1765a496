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


@pytest.fixture(scope="module")
def image():
    """A smooth random RGB image (700 x 900) for the JPEG tile tests."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8), (0, 0), 3)


@pytest.fixture(scope="module")
def abbreviated(tmp_path_factory, image):
    """Aperio-style files: abbreviated tiles + JPEGTables; RGB-coded with YCbCr-like component ids."""
    from pipeline.bench import abbreviated_jpeg_tiff

    d = tmp_path_factory.mktemp("abbrev")
    return {"rgb": abbreviated_jpeg_tiff(d / "rgb.tif", image, rgb=True),
            "ycbcr": abbreviated_jpeg_tiff(d / "ycbcr.tif", image, rgb=False)}


@pytest.fixture
def spawned_readers(monkeypatch) -> list[int]:
    """The pids of every reader process a :class:`ReaderPool` starts during the test, in order."""
    from pipeline.readers import ReaderPool

    pids: list[int] = []
    real_spawn = ReaderPool._spawn

    def spawn(self, index):
        w = real_spawn(self, index)
        pids.append(w.proc.pid)
        return w

    monkeypatch.setattr(ReaderPool, "_spawn", spawn)
    return pids
