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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The first 60,000 characters of tinyshakespeare, prepared with a character tokenizer."""
    from flatstack.data import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("data")
    (root / "in.txt").write_text((SHARED / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    prepare(PrepareConfig(inputs=[str(root / "in.txt")], out=str(root / "d"), tokenizer="char", progress=False))
    return root / "d"
