"""Everything that talks to another machine: SSH to the appliance and to the host, libvirt,
and the IPFire probe and apply protocol. Side effects live here, behind small functions."""
