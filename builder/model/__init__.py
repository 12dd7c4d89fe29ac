"""The site model: the site file as frozen dataclasses, and keys as pure derivation.

Imports no other layer: what the tool is asked to do, not how it gets done.
"""
