"""A network-namespace lab that plays an IPFire host; see tests/lab/lab.py."""

from tests.lab.lab import Lab

__all__ = ["Lab"]
