"""deploy and destroy: the site on a libvirt host, converging from wherever a run stopped.

Order matters for convergence: volumes first (named by digest, so a finished upload is
never repeated), then the domain (its metadata records what it was made from), then the
start and the wait for SSH. A run killed anywhere leaves a state the next run completes.
A deployed appliance that differs from the site is replaced by handover (handover.py): the
new one is checked before it takes over, and the old one serves until then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from builder.errors import HostError
from builder.handover import converge, hand_over
from builder.local.state import State
from builder.model.login import HostAccess
from builder.model.site import Site
from builder.progress import Progress
from builder.provision import (
    BASE_PREFIX,
    BOOT_TIMEOUT_S,
    base_volume_name,
    create_domain,
    differences,
    pool_for,
    preflight,
    retire_seed,
    volume_names,
    wait_ready_ssh,
    wanted_metadata,
)
from builder.remote import libvirtd as lh
from builder.remote.slots import site_domains, slot_names
from builder.render.libvirt_xml import META_IMAGE_DIGEST, ROLE_ACTIVE
from builder.render.seed import make_seed


class SiteChanged(HostError):
    """The deployed appliance was made from other input; --replace or upgrade hands over."""


@dataclass(frozen=True)
class Deployed:
    name: str
    outcome: str  # "created", "replaced", "started", "up to date"
    virt_type: str
    address: str
    seconds: float
    outage_s: float | None = None  # a replacement's: old link down until the new one answered


def _finish(dom, site: Site, keys, pool, seed_name: str, timeout: float, progress) -> None:
    """Wait until the appliance is ready; after a good first boot the seed goes."""
    if wait_ready_ssh(site, keys, dom, timeout, progress):
        retire_seed(dom, pool, seed_name, progress)
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

    conn = lh.connect_site(site, access, progress)
    try:
        dom = converge(conn, site, keys, progress).get(ROLE_ACTIVE)
        name = dom.name() if dom is not None else site.name
        want = wanted_metadata(site, image_digest, seed.digest, name)
        have = lh.domain_metadata(dom) if dom is not None else {}
        diff = differences(have, want) if dom is not None else []
        if diff and not replace:
            raise SiteChanged(
                f"{site.name} on {site.host.uri} differs from the site file: " + "; ".join(diff),
                "run `wg-appliance upgrade` (or `deploy --replace`) to hand over to a new one "
                "with the same keys; peer and mode changes also apply live with "
                "`wg-appliance sync`",
            )
        if diff:
            image = (image_path, image_digest)
            done = hand_over(conn, site, state, image, progress, boot_timeout=boot_timeout)
            return Deployed(
                site.name,
                "replaced",
                done.virt_type,
                done.address,
                time.monotonic() - t0,
                done.outage_s,
            )
        learned = state.learned_virt_type(lh.host_identity(conn))
        with progress.stage("preflight"):
            virt_type, report = preflight(conn, site, dom is None, learned)
            for line in report:
                progress.say(f"  {line}")
        names = volume_names(name, seed.digest)
        if dom is not None:
            pool = pool_for(conn, site, progress)
            virt_type = lh.domain_virt_type(dom) or virt_type
            outcome = "up to date"
            if not dom.isActive():
                with progress.stage(f"starting {name}"):
                    dom.create()
                outcome = "started"
        else:
            dom = create_domain(
                conn,
                site,
                state,
                seed,
                (image_path, image_digest),
                name,
                virt_type,
                want,
                progress,
            )
            virt_type = lh.domain_virt_type(dom) or virt_type
            pool = pool_for(conn, site, progress)
            outcome = "created"
        _finish(dom, site, keys, pool, names["seed"], boot_timeout, progress)
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
        removed = []
        for name in slot_names(site.name):
            keep = [volume_names(name, "")["disk"]] if keep_disk else []
            if name in (d.name() for d in site_domains(conn, site.name).values()):
                removed += lh.destroy_domain(conn, name, keep=keep)
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
