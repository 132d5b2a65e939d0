"""Shared test helpers: fixture loading and the parity tolerance.

Tolerance (the project's bar): max|Δ| <= 1e-4 * max(1, max|ref|), float32, compared only
over non-padding positions.
"""

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# The fuzz tests try this many inputs each (CI: the default; `python scripts/fuzz.py`: many more)
# and tally what happened in FUZZ_TALLY[test][outcome], outcome "read" or the error type's name.
FUZZ_EXAMPLES = int(os.environ.get("MINILM_FUZZ_EXAMPLES", "300"))
FUZZ_TALLY = collections.defaultdict(collections.Counter)


def fixture_path(name):
    path = FIXTURES / name
    if not path.is_dir():
        raise FileNotFoundError(f"fixture {name} missing: run python -m scripts.fixtures")
    return path


def load_reference(name):
    """(folder, arrays from reference.npz, metadata from reference.json)"""
    path = fixture_path(name)
    ref = dict(np.load(path / "reference.npz"))
    meta = json.loads((path / "reference.json").read_text()) if (path / "reference.json").is_file() else {}
    return path, ref, meta


def tolerance(ref):
    return 1e-4 * max(1.0, float(np.max(np.abs(ref)))) if np.size(ref) else 1e-4


def max_diff(actual, ref, keep=None):
    """max|actual - ref| over the positions `keep` marks (a boolean mask broadcast from the left)."""
    from minilm import ops

    actual, ref = np.asarray(ops.to_host(actual), np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, f"shape {actual.shape} != reference {ref.shape}"
    diff = np.abs(actual - ref)
    if keep is not None:
        keep = np.asarray(keep, bool)
        diff = diff[keep] if keep.shape == diff.shape[: keep.ndim] else diff
    return float(diff.max()) if diff.size else 0.0


def assert_close(actual, ref, keep=None, what=""):
    d, tol = max_diff(actual, ref, keep), tolerance(ref)
    assert d <= tol, f"{what}: max|Δ| = {d:.3g} > tolerance {tol:.3g}"
    return d


@pytest.fixture
def rng():
    return np.random.default_rng(0)
