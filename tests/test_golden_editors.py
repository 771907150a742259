"""The editors give the numbers they gave before the editing room was reorganised."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.golden_editors import GOLDEN, computed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden():
    """The numbers written by ``python -m tests.golden_editors`` (tests/data)."""
    return load_file(GOLDEN)


@pytest.fixture(scope="module")
def today(smol, tmp_path_factory):
    """The same numbers, computed by today's code."""
    return computed(smol, str(tmp_path_factory.mktemp("z")))


class TestSameNumbersAsBefore:
    def test_same_tensors(self, golden, today):
        """Today's code computes every golden tensor, and no other."""
        assert sorted(today) == sorted(golden)

    @pytest.mark.parametrize("piece", ["trace", "rome", "memit", "alphaedit"])
    def test_within_1e_5_of_the_largest_entry(self, golden, today, piece):
        """Trace scores, keys, targets, ΔW's writes and norms agree to 1e-5 (relative)."""
        for name in sorted(n for n in golden if n.startswith(piece)):
            expected = golden[name]
            scale = max(float(expected.abs().max()), 1e-12)
            torch.testing.assert_close(
                today[name], expected, atol=1e-5 * scale, rtol=0, msg=f"{name} changed"
            )
