import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# a private cache per test session: cached tables and the trained digits model never leak between runs
os.environ["MPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mpsearch-test-cache-")


@pytest.fixture(scope="session")
def digits():
    from mpsearch.models import load

    return load("digits-cnn")


@pytest.fixture(scope="session")
def minilm():
    from mpsearch.models import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def effnet():
    from mpsearch.models import load

    return load("efficientnet-lite0")
