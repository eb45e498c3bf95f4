"""The newest wheel of a vendor package from PyPI, for tests that read it without installing it (its source or its
operator schemas): downloaded into $DSV32_CACHE_DIR/wheels, or the cached one when PyPI cannot be reached; the test
skips with the reason when there is neither."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from dsv32.core import envs


def newest_wheel(package: str, timeout: int = 600) -> zipfile.ZipFile:
    folder = os.path.join(envs.cache_dir(), "wheels")
    os.makedirs(folder, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        "-d", folder, package], capture_output=True, text=True, timeout=timeout)
    found = sorted(glob.glob(os.path.join(folder, package.replace("-", "_") + "-*.whl")), key=os.path.getmtime)
    if not found:
        pytest.skip(f"no {package} wheel: pip download failed ({r.stderr.strip()[-300:]}) and none is cached in {folder}")
    return zipfile.ZipFile(found[-1])
