"""`appliance_image`: the appliance qcow2 for this session, built once and cached by recipe digest.

A cold build needs root and takes about a minute; with the recipe unchanged it is a cache hit
in well under a second. Without root and without a cached image, dependent tests are skipped.
"""

from __future__ import annotations

import os

import pytest

from builder.errors import HostError
from builder.image.build import Image, build_image, default_cache_dir
from builder.progress import Progress


@pytest.fixture(scope="session")
def appliance_image() -> Image:
    try:
        return build_image(cache=default_cache_dir(), progress=Progress())
    except HostError as e:
        if os.geteuid() != 0:
            pytest.skip(f"no cached appliance image and cannot build one: {e}")
        raise
