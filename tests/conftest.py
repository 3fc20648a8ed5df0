from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, the parity measure used throughout."""
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
