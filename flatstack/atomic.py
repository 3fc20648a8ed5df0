"""Atomic folder writes: build a folder beside its final name, then rename it into place, so a reader
(or a process killed mid-write) sees the old folder or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing dst; each rename is atomic, so dst or dst.old is always whole."""
    for f in src.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
