"""Where the real images of ../shared/realdata are (FER_REALDATA overrides), and the skip for when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REALDATA = Path(os.environ.get("FER_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
CK48 = REALDATA / "ckplus48" / "CK+48"
# CK+'s subjects are the first part of the file name (S010_004_00000017.png)
CK48_SUBJECT = "re:^(S[0-9]+)_"

requires_ckplus48 = pytest.mark.skipif(
    not CK48.is_dir(),
    reason=f"real CK+48 images not found at {CK48} (set FER_REALDATA to the folder holding ckplus48/)",
)
