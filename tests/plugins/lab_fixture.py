"""The session-scoped `lab` fixture: the IPFire-like lab, always torn down."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.lab import Lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """Bring the lab up once per session; down even when tests fail."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, libvirtd)")
    lab = Lab()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
