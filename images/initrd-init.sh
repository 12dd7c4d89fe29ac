#!/bin/sh
# The appliance's initramfs /init, run by klibc's sh. The kernel has ext4 built in but not
# the virtio disk driver: load that, find the root filesystem named by root=UUID=, and hand
# over to systemd. No udev, no blkid: a candidate partition is the root when its own
# /etc/fstab mounts it as that UUID.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Under emulation (libvirt's type='qemu', TCG) qemu translates guest code once per virtual
# address: with every program and library mapped at a new random address on each exec, each
# process start translates all it runs anew. A fixed layout lets the translations be reused,
# which halves the cost of every exec (an SSH login, sudo, each unit of the boot). A guest
# under KVM has kvm-clock and keeps its randomized layout.
read -r clocks < /sys/devices/system/clocksource/clocksource0/available_clocksource
case " $clocks " in
    *" kvm-clock "*) ;;
    *) echo 0 > /proc/sys/kernel/randomize_va_space ;;
esac

while read -r module; do
    insmod "/lib/modules/$module"
done < /lib/modules/load-order

uuid=
init=/sbin/init
rw=
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        root=UUID=*) uuid="${arg#root=UUID=}" ;;
        init=*) init="${arg#init=}" ;;
        rw) rw=1 ;;
        ro) rw= ;;
    esac
done

is_root() {
    [ -r /root/etc/fstab ] || return 1
    while read -r spec rest; do
        [ "$spec" = "UUID=$uuid" ] && return 0
    done < /root/etc/fstab
    return 1
}

tries=0
while [ "$tries" -lt 300 ]; do
    for dev in /dev/vd[a-z][0-9] /dev/vd[a-z][0-9][0-9] /dev/sd[a-z][0-9]; do
        [ -b "$dev" ] || continue
        if mount -t ext4 -o ro "$dev" /root 2>/dev/null; then
            is_root && break 2
            umount /root
        fi
    done
    tries=$((tries + 1))
    sleep 0.1
done

if ! is_root; then
    echo "initramfs: no root filesystem with UUID=$uuid; dropping to a shell" > /dev/console
    exec sh < /dev/console > /dev/console 2>&1
fi

# `rw`: the root goes read-write here (the filesystem's default is errors=remount-ro), so
# systemd has no remount to do.
if [ -n "$rw" ] && ! mount -o remount,rw "$dev" /root; then
    echo "initramfs: cannot mount the root read-write; booting it read-only" > /dev/console
fi

mount -o move /dev /root/dev
mount -o move /sys /root/sys
mount -o move /proc /root/proc
exec run-init /root "$init" "$@" < /root/dev/console > /root/dev/console 2>&1
