import atexit
import os
import shutil
import tempfile

import pytest

# Every test builds the tiny model and demo data into a private cache: tests never read or
# write a user's cache (an EMOTRAIN_CACHE of their own included) and never touch the
# network. Under pytest-xdist the controller makes the cache and its workers inherit it
# (one tiny model for the whole session); only the process that made it removes it, after
# every worker is done.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and os.environ.get("EMOTRAIN_TEST_CACHE"):
    _CACHE = os.environ["EMOTRAIN_TEST_CACHE"]
else:
    _CACHE = tempfile.mkdtemp(prefix="emotrain-test-cache-")
    os.environ["EMOTRAIN_TEST_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["EMOTRAIN_CACHE"] = _CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Workers share the cores: one OpenMP thread each (inherited by the commands they start),
# or torch's threads spin against each other and everything slows down many times over.
if _WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


@pytest.hookimpl(optionalhook=True)  # also without pytest-xdist (-p no:xdist)
def pytest_xdist_auto_num_workers(config):
    # Each worker's commands hold a model and its imports (~0.5-1.5 GB): a few suffice.
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(scope="session")
def tiny_path():
    from emotrain.sdxl import tiny_sdxl_path
    return tiny_sdxl_path()


# emotrain.cli hides bitsandbytes until an 8-bit optimizer asks for it (quiet.py). A test
# module that imports the CLI before anything imported diffusers' UNet would make
# diffusers' lazy import of that module fail on the hidden package, depending only on
# which test files a worker collects first: import it once, here, before any of them.
import diffusers.models.unets.unet_2d_condition  # noqa: E402,F401
