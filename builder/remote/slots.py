"""A site's two libvirt domains: the one that serves, and the one an upgrade stages or
keeps for rollback. Which is which is in each domain's metadata (its role), not its name,
since a running domain cannot be renamed: the two names take turns.

The invariant every step keeps: at most one of them has its NIC's link up, so two
appliances never answer on the site's LAN address, even when a run is killed between steps.
"""

from __future__ import annotations

import libvirt

from builder.errors import HostError
from builder.remote.libvirtd import domain_metadata, find_domain, set_domain_metadata
from builder.render.libvirt_xml import (
    META_ROLE,
    META_SITE,
    ROLE_ACTIVE,
    interface_xml,
    link_is_up,
)

SLOT_SUFFIXES = ("", "_2", "_3")  # host names have no '_': no other site's domain is named so


def slot_names(site_name: str) -> tuple[str, ...]:
    """Three names: the active one, the previous one, and one for an upgrade to stage in, so a
    failed upgrade leaves the previous appliance where it was."""
    return tuple(site_name + suffix for suffix in SLOT_SUFFIXES)


def free_slot(site_name: str, used: set[str]) -> str:
    return next(n for n in slot_names(site_name) if n not in used)


def twin(role_name: str) -> str:
    """The key site_domains files the second of two domains that claim one role under (a run
    died between the two role writes of a takeover); converge reads it back."""
    return role_name + "_2"


def role(meta: dict[str, str]) -> str:
    return meta.get(META_ROLE) or ROLE_ACTIVE


def site_domains(conn: libvirt.virConnect, site_name: str) -> dict[str, libvirt.virDomain]:
    """The site's domains by role. A domain under one of its names that the tool did not make,
    or that belongs to another site, is an error: it is never touched."""
    found: dict[str, libvirt.virDomain] = {}
    for name in slot_names(site_name):
        dom = find_domain(conn, name)
        if dom is None:
            continue
        meta = domain_metadata(dom)
        if meta is None or meta.get(META_SITE, site_name) != site_name:
            raise HostError(
                f"the host already has a domain {name} that is not this site's appliance",
                "choose another appliance.name, or remove that domain yourself",
            )
        r = role(meta)
        if r in found:  # two domains claim one role: a run died between two metadata writes
            r = twin(r)
        found[r] = dom
    return found


def active_domain(conn: libvirt.virConnect, site_name: str) -> libvirt.virDomain | None:
    """The domain that serves the site (the only one before the first upgrade)."""
    return site_domains(conn, site_name).get(ROLE_ACTIVE)


def set_role(dom: libvirt.virDomain, new_role: str) -> None:
    meta = domain_metadata(dom) or {}
    if meta.get(META_ROLE) != new_role:
        meta[META_ROLE] = new_role
        set_domain_metadata(dom, meta)
    dom.setAutostart(1 if new_role == ROLE_ACTIVE else 0)


def link_up(dom: libvirt.virDomain) -> bool:
    """Whether the domain is on the LAN now: running with its NIC's link up."""
    return bool(dom.isActive()) and link_is_up(dom.XMLDesc(0))


def set_link(dom: libvirt.virDomain, up: bool) -> None:
    """The NIC's link up or down, in the running guest and in the saved definition, so a
    restart keeps it. A guest sees carrier come and go; qemu drops its frames while down."""
    saved = interface_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), up)
    if saved is None:
        raise HostError(f"{dom.name()} has no network interface", "destroy and deploy it again")
    live = _live_change(dom, up)
    if live is not None:
        dom.updateDeviceFlags(live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if link_is_up(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) != up:
        dom.updateDeviceFlags(saved, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def switch_links(old: libvirt.virDomain, new: libvirt.virDomain) -> None:
    """`old`'s link down, then `new`'s up, with nothing between the two live changes (both
    made ready first): the LAN is without an appliance for two calls to qemu. The saved
    definitions follow."""
    down, up = _live_change(old, False), _live_change(new, True)
    if down is not None:
        old.updateDeviceFlags(down, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if up is not None:
        new.updateDeviceFlags(up, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    set_link(old, False)
    set_link(new, True)


def _live_change(dom: libvirt.virDomain, up: bool) -> str | None:
    """The interface XML that puts a running domain's link `up`, or None: nothing to do."""
    if not dom.isActive():
        return None
    xml = dom.XMLDesc(0)
    if link_is_up(xml) == up:
        return None
    live = interface_xml(xml, up)
    if live is None:
        raise HostError(f"{dom.name()} has no network interface", "destroy and deploy it again")
    return live
