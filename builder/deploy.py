"""deploy and destroy: the site on a libvirt host, converging from wherever a run stopped.

Order matters for convergence: volumes first (named by digest, so a finished upload is
never repeated), then the domain (its metadata records what it was made from), then the
start and the wait for SSH. A run killed anywhere leaves a state the next run completes.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from builder.errors import ConnectError, GuestError, HostError
from builder.local.files import OutDir, write_files
from builder.local.state import State
from builder.model.keys import Keys
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.progress import Progress
from builder.remote import libvirtd as lh
from builder.remote.appliance import target_for
from builder.remote.libvirtd import serial_tail
from builder.remote.ssh import execute, wait_for_ssh
from builder.render.libvirt_xml import (
    META_BRIDGE,
    META_DISK_GIB,
    META_IMAGE_DIGEST,
    META_MAC,
    META_MEMORY_MIB,
    META_POOL,
    META_SEED_DIGEST,
    META_SITE,
    META_VCPUS,
    META_VOLUMES,
    DomainSpec,
)
from builder.render.seed import SECRET, make_seed

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


class SiteChanged(HostError):
    """The deployed appliance was made from other input; --replace recreates it."""


@dataclass(frozen=True)
class Deployed:
    name: str
    outcome: str  # "created", "replaced", "started", "up to date"
    virt_type: str
    address: str
    seconds: float


BASE_PREFIX = "wg-appliance-base-"


def base_volume_name(image_digest: str) -> str:
    return f"{BASE_PREFIX}{image_digest[:16]}.qcow2"


def volume_names(site: Site, seed_digest: str) -> dict[str, str]:
    return {
        "disk": f"{site.name}-disk.qcow2",
        "seed": f"{site.name}-seed-{seed_digest[:12]}.iso",
        "serial": f"{site.name}-serial.log",
    }


def wanted_metadata(site: Site, image_digest: str, seed_digest: str) -> dict[str, str]:
    names = volume_names(site, seed_digest)
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
    labels = {
        META_IMAGE_DIGEST: "image",
        META_SEED_DIGEST: "seed (site, peers or keys)",
    }
    out = []
    for key, value in want.items():
        if key == META_VOLUMES:
            continue
        if have.get(key) != value:
            label = labels.get(key, key)
            out.append(f"{label}: {have.get(key, '(none)')[:16]} -> {value[:16]}")
    return out


def preflight(conn: libvirt.virConnect, site: Site, need_memory: bool) -> tuple[str, list[str]]:
    """Checks before anything changes; raises on the first failure with its fix."""
    virt_type, why = lh.choose_virt_type(conn)
    report = [f"libvirt: {site.host.uri} reachable", f"virtualisation: {virt_type} ({why})"]
    lh.check_bridge(conn, site.host.bridge)
    report.append(f"bridge: {site.host.bridge}")
    if need_memory:
        lh.check_memory(conn, site.appliance.memory_mib)
        report.append(f"memory: {site.appliance.memory_mib} MiB available")
    return virt_type, report


def _wait_ready(
    site: Site,
    keys: Keys,
    pool: libvirt.virStoragePool,
    serial: str,
    timeout: float,
    progress: Progress,
) -> bool:
    """Ready means: SSH answers with the pinned key and cloud-init has finished, since sshd
    starts before cloud-init's final stage brings wg0 up. True when cloud-init succeeded
    and is switched off."""
    deadline = time.monotonic() + timeout
    with progress.stage(f"waiting for SSH on {site.lan.address.ip} (pinned host key)"):
        try:
            client = wait_for_ssh(target_for(site, keys), deadline)
        except ConnectError as e:
            tail = "\n".join(serial_tail(pool, serial).splitlines()[-25:])
            raise HostError(
                f"{site.name} did not answer SSH: {e}\n--- last lines of the serial log ---\n"
                f"{tail}",
                "check that the LAN address is free and the bridge reaches this machine; "
                "run the same deploy again to keep waiting",
            ) from None
    with progress.stage("waiting for cloud-init to finish"):
        try:
            left = max(1, int(deadline - time.monotonic()))
            wait = f"until [ -e {CLOUD_INIT_RESULT} ] || [ -e {KEPT_RESULT} ]; do sleep 1; done"
            result = execute(client, f"timeout {left} sh -c '{wait}'", timeout=left + 10)
            if result.rc != 0:
                raise HostError(
                    f"cloud-init on {site.name} did not finish within {timeout:.0f}s",
                    f"run `wg-appliance verify --site {site.path}` to see what it is doing",
                )
            return _switch_cloud_init_off(client, site)
        finally:
            client.close()


def _switch_cloud_init_off(client, site: Site) -> bool:
    """True when the first boot succeeded and cloud-init is now off; False (seed kept, so a
    fix can boot from it) when cloud-init reported errors."""
    shown = execute(client, f"cat {CLOUD_INIT_RESULT} 2>/dev/null || cat {KEPT_RESULT}").stdout
    try:
        errors = json.loads(shown)["v1"]["errors"]
    except (ValueError, KeyError, TypeError):
        errors = ["no readable result.json"]
    if errors:
        return False
    r = execute(client, "sudo -n sh -c " + shlex.quote(SWITCH_OFF))
    if r.rc != 0:
        raise GuestError(
            f"could not switch cloud-init off on {site.name}: {r.stderr.strip()[-300:]}",
            "run the same deploy again",
        )
    return True


def _retire_seed(
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


def _pool(conn: libvirt.virConnect, site: Site, progress: Progress) -> libvirt.virStoragePool:
    """The site's pool, made when missing; says so when others can list its folder."""
    pool = lh.ensure_pool(conn, site.host.pool, site.host.pool_path)
    note = lh.check_pool_privacy(pool)
    if note:
        progress.say(f"  note: {note}")
    return pool


def _finish(
    dom: libvirt.virDomain,
    site: Site,
    keys: Keys,
    pool: libvirt.virStoragePool,
    names: dict[str, str],
    timeout: float,
    progress: Progress,
) -> None:
    """Wait until the appliance is ready; after a good first boot the seed goes."""
    if _wait_ready(site, keys, pool, names["serial"], timeout, progress):
        _retire_seed(dom, pool, names["seed"], progress)
    else:
        progress.say("cloud-init reported errors: the seed stays; see wg-appliance verify")


def deploy(
    site: Site,
    state: State,
    image_path: Path,
    image_digest: str,
    progress: Progress,
    replace: bool = False,
    boot_timeout: float = BOOT_TIMEOUT_S,
    access: HostAccess | None = None,
) -> Deployed:
    t0 = time.monotonic()
    keys = state.keys_for(site)
    seed = make_seed(site, keys)
    want = wanted_metadata(site, image_digest, seed.digest)
    names = volume_names(site, seed.digest)

    conn = lh.connect_site(site, access, progress)
    try:
        dom = lh.find_domain(conn, site.name)
        have = lh.domain_metadata(dom) if dom is not None else None
        with progress.stage("preflight"):
            virt_type, report = preflight(conn, site, need_memory=dom is None or replace)
            for line in report:
                progress.say(f"  {line}")
        if dom is not None and have is None:
            raise HostError(
                f"the host already has a domain {site.name} that wg-appliance did not make",
                "choose another appliance.name, or remove that domain yourself",
            )
        outcome = "created"
        if have is not None:
            diff = differences(have, want)
            if diff and not replace:
                raise SiteChanged(
                    f"{site.name} on {site.host.uri} differs from the site file: "
                    + "; ".join(diff),
                    "run `wg-appliance deploy --replace` to recreate it with the same keys; "
                    "peer and mode changes also apply live with `wg-appliance sync`",
                )
            if diff:
                with progress.stage(f"removing the old {site.name}"):
                    lh.destroy_domain(conn, site.name)
                outcome = "replaced"
            else:
                pool = _pool(conn, site, progress)
                virt_type = lh.domain_virt_type(dom) or virt_type
                if not dom.isActive():
                    with progress.stage(f"starting {site.name}"):
                        dom.create()
                    outcome = "started"
                else:
                    outcome = "up to date"
                _finish(dom, site, keys, pool, names, boot_timeout, progress)
                return Deployed(
                    site.name, outcome, virt_type, str(site.lan.address.ip), time.monotonic() - t0
                )

        with OutDir(state.path / "seed") as out:
            write_files(out, seed.files, secret=SECRET)
        with progress.stage("storage"):
            pool = _pool(conn, site, progress)
            base = lh.upload_volume(
                pool, base_volume_name(image_digest), image_path, progress, mode=None
            )
            seed_vol = lh.upload_volume(
                pool, names["seed"], state.path / "seed" / "seed.iso", progress
            )
            disk = lh.create_disk(pool, names["disk"], base, site.appliance.disk_gib)
        pool_dir = Path(lh.pool_path(pool))
        spec = DomainSpec(
            name=site.name,
            memory_mib=site.appliance.memory_mib,
            vcpus=site.appliance.vcpus,
            virt_type=virt_type,
            disk_path=disk.path(),
            seed_path=seed_vol.path(),
            bridge=site.host.bridge,
            mac=site.lan.mac,
            serial_log_path=str(pool_dir / names["serial"]),
            metadata=want,
        )
        with progress.stage(f"defining and starting {site.name} ({virt_type})"):
            dom = lh.start_domain(conn, spec, progress)
            virt_type = lh.domain_virt_type(dom) or virt_type
        _finish(dom, site, keys, pool, names, boot_timeout, progress)
        return Deployed(
            site.name, outcome, virt_type, str(site.lan.address.ip), time.monotonic() - t0
        )
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt: {e}", "run the same command again; it resumes") from e
    finally:
        conn.close()


def destroy(
    site: Site,
    keep_disk: bool = False,
    everything: bool = False,
    access: HostAccess | None = None,
) -> list[str]:
    """Remove the appliance's domain and its own volumes (checked through the metadata);
    with `everything`, also base images in the site's pool that no domain uses any more."""
    conn = lh.connect_site(site, access)
    try:
        keep = [volume_names(site, "")["disk"]] if keep_disk else []
        removed = lh.destroy_domain(conn, site.name, keep=keep)
        if everything:
            removed += _remove_unused_bases(conn, site.host.pool)
        return removed
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt: {e}", "run the same command again") from e
    finally:
        conn.close()


def _remove_unused_bases(conn: libvirt.virConnect, pool_name: str) -> list[str]:
    pool = lh.find_pool(conn, pool_name)
    if pool is None:
        return []
    used = set()
    for dom in conn.listAllDomains(0):
        meta = lh.domain_metadata(dom)
        if meta and META_IMAGE_DIGEST in meta:
            used.add(base_volume_name(meta[META_IMAGE_DIGEST]))
    pool.refresh(0)
    removed = []
    for vol in pool.listAllVolumes(0):
        if vol.name().startswith(BASE_PREFIX) and vol.name() not in used:
            vol.delete(0)
            removed.append(f"volume {vol.name()}")
    return removed
