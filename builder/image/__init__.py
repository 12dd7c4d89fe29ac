"""The appliance disk image: build stages, kernel modules and the initramfs."""
