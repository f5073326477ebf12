"""Fixtures shared by the test modules (a module may still define its own to override one)."""

from __future__ import annotations

import numpy as np
import pytest

from framepack.testing import tiny_bundle


@pytest.fixture(scope="module")
def bundle():
    """The tiny random bundle of `framepack.testing` in the release's (inverted) order."""
    return tiny_bundle()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 64x96 start image: an orange square on black."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[16:48, 24:56] = (200, 80, 30)
    return img


@pytest.fixture
def queue(bundle, tmp_path):
    """A GUI job queue on the tiny bundle, writing into `tmp_path / "out"`; closed afterwards."""
    from framepack.gui.jobs import JobQueue

    q = JobQueue(bundle, tmp_path / "out")
    yield q
    q.close()
