import atexit
import os
import shutil
import tempfile

import pytest

# Every test builds the tiny model and demo data into a private cache: tests never read a
# user's cache and never touch the network.
_CACHE = tempfile.mkdtemp(prefix="emotrain-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("EMOTRAIN_CACHE", _CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_path():
    from emotrain.sdxl import tiny_sdxl_path
    return tiny_sdxl_path()
