"""wg-appliance: a WireGuard gateway VM appliance from one declarative site file."""

__version__ = "0.1.0"
