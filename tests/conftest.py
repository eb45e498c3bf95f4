import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/_tiny.py helpers

from dsv32.backends import present_devices  # noqa: E402

if not any(present_devices().values()):
    # No GPU: Triton kernels run on the CPU interpreter (must be set before any kernel module is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Device tests skip with the reason when the hardware is absent."""
    present = present_devices()
    for item in items:
        for mark, ok in present.items():
            if mark in item.keywords and not ok:
                item.add_marker(pytest.mark.skip(reason=f"needs a {mark} device; none present"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The default tiny checkpoint (fp32, saved by transformers) shared by many tests."""
    from _tiny import make_checkpoint

    path = str(tmp_path_factory.mktemp("tiny"))
    make_checkpoint(path, seed=1)
    return path
