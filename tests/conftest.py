"""The demo world is built once per test run (or reused from its cache) and shared by every test."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_world() -> Path:
    from emotion_dpo.demo_world import DEFAULT_DIR, ensure_demo_world

    return ensure_demo_world(os.environ.get("DEMO_WORLD_DIR", DEFAULT_DIR))
