"""This machine: the state dir, the one way to write files, and the one way to run commands."""
