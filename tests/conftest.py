"""Shared pytest setup: ``tests/`` on ``sys.path`` and session-wide fixtures.

``modelzoo`` (torch, onnxruntime) is imported only when a test asks for the
``model_zoo`` fixture, so tests that do not need golden models stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run the IR verifier after every compiler pass (qnnjit/compiler/pipeline.py).
os.environ.setdefault("QNNJIT_VERIFY", "1")
# Cold compiles start no helper process here (tests/test_cpu_compile_jobs.py
# tests those): each test's compile stays in one process, as it always did.
os.environ.setdefault("QNNJIT_COMPILE_JOBS", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The golden-model zoo (``modelzoo.ModelZoo``), built lazily, each model
    once per session, into ``$QNNJIT_MODELZOO_DIR`` if set (reused across
    runs) or a session temporary directory. It is also made the default zoo,
    so ``modelzoo.build(...)`` shares its files."""
    import modelzoo

    where = os.environ.get("QNNJIT_MODELZOO_DIR") or tmp_path_factory.mktemp("modelzoo")
    return modelzoo.set_default_zoo(modelzoo.ModelZoo(where))
