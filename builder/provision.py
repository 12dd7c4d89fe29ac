"""Making one appliance domain on a host, shared by deploy and upgrade: its volumes, its
definition, the wait for its first boot, and the seed's retirement afterwards.

Volumes are named by digest, so a finished upload is never repeated; the domain's metadata
records what it was made from. A domain is named for its slot (see remote/slots.py), so
every name here derives from the domain name, not the site's.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from builder.errors import ConnectError, GuestError, HostError
from builder.local.files import OutDir, write_files
from builder.local.state import State
from builder.model.keys import Keys
from builder.model.site import Site
from builder.progress import Progress
from builder.remote import guest_agent
from builder.remote import libvirtd as lh
from builder.remote.appliance import target_for
from builder.remote.ssh import Result, execute, wait_for_ssh
from builder.render.libvirt_xml import (
    META_BRIDGE,
    META_DISK_GIB,
    META_IMAGE_DIGEST,
    META_MAC,
    META_MEMORY_MIB,
    META_POOL,
    META_ROLE,
    META_SEED_DIGEST,
    META_SITE,
    META_VCPUS,
    META_VOLUMES,
    DomainSpec,
)
from builder.render.seed import SECRET, Seed

BOOT_TIMEOUT_S = 900.0
CLOUD_INIT_RESULT = "/run/cloud-init/result.json"
KEPT = "/var/lib/wg-appliance"  # the agent reads the first boot's result here later
KEPT_RESULT = f"{KEPT}/cloud-init-result.json"
# After a good first boot: keep cloud-init's result for verify, then switch cloud-init off
# with its own switch, so a boot without the seed never provisions the appliance anew.
SWITCH_OFF = (
    "set -e; if [ -e /run/cloud-init/result.json ]; then "
    f"install -d -m 0755 {KEPT}; "
    f"cp /run/cloud-init/status.json {KEPT}/cloud-init-status.json; "
    f"cp /run/cloud-init/result.json {KEPT_RESULT}; fi; "
    "touch /etc/cloud/cloud-init.disabled"
)
HAS_RESULT = f"[ -e {CLOUD_INIT_RESULT} ] || [ -e {KEPT_RESULT} ]"
WAIT_RESULT = f"until {HAS_RESULT}; do sleep 1; done"
# Through the guest agent: the boot's end (cloud-init's units are part of it, and on a later
# boot, a rollback's, wg0's routes and the exporter still start), then cloud-init's result.
# None then means cloud-init never ran: a broken image, not a slow one.
NEVER_RAN = 3
WAIT_BOOT = f"systemctl is-system-running --wait >/dev/null; {HAS_RESULT} || exit {NEVER_RAN}"

BASE_PREFIX = "wg-appliance-base-"


class NotProvisioned(GuestError):
    """A domain booted to its end without cloud-init: waiting longer cannot help."""


Run = Callable[[str], Result]  # a shell command in the guest, as root or through sudo


def base_volume_name(image_digest: str) -> str:
    return f"{BASE_PREFIX}{image_digest[:16]}.qcow2"


def volume_names(domain: str, seed_digest: str) -> dict[str, str]:
    return {
        "disk": f"{domain}-disk.qcow2",
        "seed": f"{domain}-seed-{seed_digest[:12]}.iso",
        "serial": f"{domain}-serial.log",
    }


def wanted_metadata(
    site: Site, image_digest: str, seed_digest: str, domain: str | None = None
) -> dict[str, str]:
    names = volume_names(domain or site.name, seed_digest)
    return {
        META_SITE: site.name,
        META_IMAGE_DIGEST: image_digest,
        META_SEED_DIGEST: seed_digest,
        META_POOL: site.host.pool,
        META_VOLUMES: " ".join(names.values()),
        META_MEMORY_MIB: str(site.appliance.memory_mib),
        META_VCPUS: str(site.appliance.vcpus),
        META_DISK_GIB: str(site.appliance.disk_gib),
        META_BRIDGE: site.host.bridge,
        META_MAC: site.lan.mac,
    }


def differences(have: dict[str, str], want: dict[str, str]) -> list[str]:
    """What a domain's metadata says it was made from, against what the site wants now."""
    labels = {
        META_IMAGE_DIGEST: "image",
        META_SEED_DIGEST: "seed (site, peers or keys)",
    }
    out = []
    for key, value in want.items():
        if key in (META_VOLUMES, META_ROLE):
            continue
        if have.get(key) != value:
            label = labels.get(key, key)
            out.append(f"{label}: {have.get(key, '(none)')[:16]} -> {value[:16]}")
    return out


def preflight(
    conn: libvirt.virConnect, site: Site, need_memory: bool, learned: str | None = None
) -> tuple[str, list[str]]:
    """Checks before anything changes; raises on the first failure with its fix. `learned`:
    the virtualisation type an earlier deploy found to work on this host."""
    virt_type, why = lh.choose_virt_type(conn, learned)
    report = [f"libvirt: {site.host.uri} reachable", f"virtualisation: {virt_type} ({why})"]
    lh.check_bridge(conn, site.host.bridge)
    report.append(f"bridge: {site.host.bridge}")
    if need_memory:
        lh.check_memory(conn, site.appliance.memory_mib)
        report.append(f"memory: {site.appliance.memory_mib} MiB available")
    return virt_type, report


def pool_for(conn: libvirt.virConnect, site: Site, progress: Progress) -> libvirt.virStoragePool:
    """The site's pool, made when missing; says so when others can list its folder."""
    pool = lh.ensure_pool(conn, site.host.pool, site.host.pool_path)
    note = lh.check_pool_privacy(pool)
    if note:
        progress.say(f"  note: {note}")
    return pool


def create_domain(
    conn: libvirt.virConnect,
    site: Site,
    state: State,
    seed: Seed,
    image: tuple[Path, str],
    domain: str,
    virt_type: str,
    metadata: dict[str, str],
    progress: Progress,
    staged: bool = False,
) -> libvirt.virDomain:
    """Volumes, definition and start of domain `domain`. `staged`: its link down and no
    autostart, for an upgrade that checks it before it takes over. Returns the running domain."""
    image_path, image_digest = image
    names = volume_names(domain, seed.digest)
    with OutDir(state.path / "seed") as out:
        write_files(out, seed.files, secret=SECRET)
    with progress.stage("storage"):
        pool = pool_for(conn, site, progress)
        base = lh.upload_volume(
            pool, base_volume_name(image_digest), image_path, progress, mode=None
        )
        seed_vol = lh.upload_volume(pool, names["seed"], state.path / "seed" / "seed.iso", progress)
        disk = lh.create_disk(pool, names["disk"], base, site.appliance.disk_gib)
    spec = DomainSpec(
        name=domain,
        memory_mib=site.appliance.memory_mib,
        vcpus=site.appliance.vcpus,
        virt_type=virt_type,
        disk_path=disk.path(),
        seed_path=seed_vol.path(),
        bridge=site.host.bridge,
        mac=site.lan.mac,
        serial_log_path=str(Path(lh.pool_path(pool)) / names["serial"]),
        metadata=metadata,
        link_up=not staged,
    )
    host = lh.host_identity(conn)
    learned = state.learned_virt_type(host)
    with progress.stage(f"defining and starting {domain} ({virt_type})"):
        watch = 0.0 if learned == "kvm" else lh.KVM_WATCH_S
        dom = lh.start_domain(conn, spec, progress, kvm_watch_s=watch, autostart=not staged)
    if spec.virt_type == "kvm":  # KVM was tried: the next deploy here need not try again
        state.learn_virt_type(host, lh.domain_virt_type(dom) or virt_type)
    return dom


def first_boot_errors(run: Run) -> list[str]:
    """cloud-init's errors from the first boot's result (the kept copy once it is off)."""
    shown = run(f"cat {CLOUD_INIT_RESULT} 2>/dev/null || cat {KEPT_RESULT}").stdout
    try:
        return list(json.loads(shown)["v1"]["errors"])
    except (ValueError, KeyError, TypeError):
        return ["no readable result.json"]


def switch_cloud_init_off(run: Run, name: str) -> bool:
    """True when the first boot succeeded and cloud-init is now off; False (seed kept, so a
    fix can boot from it) when cloud-init reported errors."""
    if first_boot_errors(run):
        return False
    r = run("sudo -n sh -c " + shlex.quote(SWITCH_OFF))
    if r.rc != 0:
        raise GuestError(
            f"could not switch cloud-init off on {name}: {r.stderr.strip()[-300:]}",
            "run the same command again",
        )
    return True


def wait_ready_ssh(
    site: Site, keys: Keys, dom: libvirt.virDomain, timeout: float, progress: Progress
) -> bool:
    """Ready means: SSH answers with the pinned key and cloud-init has finished, since sshd
    starts before cloud-init's final stage brings wg0 up. True when cloud-init succeeded
    and is switched off."""
    deadline = time.monotonic() + timeout
    with progress.stage(f"waiting for SSH on {site.lan.address.ip} (pinned host key)"):
        try:
            client = wait_for_ssh(target_for(site, keys), deadline)
        except ConnectError as e:
            raise HostError(
                f"{site.name} did not answer SSH: {e}\n--- last lines of the serial log ---\n"
                f"{lh.appliance_serial_tail(dom.connect(), dom.name()) or '(none)'}",
                "check that the LAN address is free and the bridge reaches this machine; "
                "run the same deploy again to keep waiting",
            ) from None
    with progress.stage("waiting for cloud-init to finish"):
        try:
            left = max(1, int(deadline - time.monotonic()))
            result = execute(client, f"timeout {left} sh -c '{WAIT_RESULT}'", timeout=left + 10)
            if result.rc != 0:
                raise HostError(
                    f"cloud-init on {site.name} did not finish within {timeout:.0f}s",
                    f"run `wg-appliance verify --site {site.path}` to see what it is doing",
                )
            return switch_cloud_init_off(lambda cmd: execute(client, cmd), site.name)
        finally:
            client.close()


def wait_ready_agent(dom: libvirt.virDomain, timeout: float, progress: Progress) -> bool:
    """The same wait as wait_ready_ssh for a domain whose link is down: through its guest
    agent. True when cloud-init succeeded (or ran at an earlier boot) and is off."""
    deadline = time.monotonic() + timeout
    with progress.stage(f"waiting for {dom.name()}'s guest agent (link still down)"):
        guest_agent.wait(dom, deadline)
    with progress.stage(f"waiting for cloud-init on {dom.name()} to finish"):
        left = max(1, int(deadline - time.monotonic()))
        r = guest_agent.run(dom, f"timeout {left} sh -c '{WAIT_BOOT}'", timeout=left + 10)
        if r.rc == NEVER_RAN:
            raise NotProvisioned(
                f"cloud-init did not run on {dom.name()}: its boot finished without it",
                "the image does not start cloud-init; rebuild it with `wg-appliance image`",
            )
        if r.rc != 0:
            raise HostError(
                f"cloud-init on {dom.name()} did not finish within {timeout:.0f}s",
                "see its serial log; run the same command again to keep waiting",
            )
        return switch_cloud_init_off(lambda cmd: guest_agent.run(dom, cmd), dom.name())


def retire_seed(
    dom: libvirt.virDomain, pool: libvirt.virStoragePool, seed: str, progress: Progress
) -> None:
    """The seed holds every private key: out of the domain and off the host once the
    appliance has its own copy on its disk."""
    taken = lh.retire_seed(dom)
    vol = lh.find_volume(pool, seed)
    if vol is not None:
        vol.delete(0)
    if taken or vol is not None:
        progress.say(f"seed {seed} taken out of {dom.name()} and deleted from the host")
