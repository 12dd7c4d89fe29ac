"""Rendering: model in, file contents out (the appliance's seed, libvirt XML, IPFire's files).

Pure: no libvirt, no SSH, no subprocess, no writing.
"""
