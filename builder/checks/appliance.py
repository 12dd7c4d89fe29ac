"""Is the appliance as the site file says? Pure judgements of the facts its agent gathered.

One Check per thing an admin would look at (cloud-init, wg0, peers, forwarding, firewall,
routes, gateway, handshakes, resources); facts in, a Report out, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from builder.checks.drift import lan_gateways, peer_drift
from builder.checks.result import Check
from builder.model.keys import Keys
from builder.model.site import Site
from builder.text import printable

HANDSHAKE_FRESH_S = 180


@dataclass(frozen=True)
class Report:
    appliance: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> str:
        return json.dumps(
            {"ok": self.ok, "appliance": self.appliance, "checks": [asdict(c) for c in self.checks]}
        )

    def table(self) -> str:
        """One line per check; details quote the guest, so its text is escaped (and
        to_json keeps it raw, as json.dumps escapes controls itself)."""
        names = [_line(c.name) for c in self.checks]
        width = max(len(n) for n in names)
        lines = [
            f"{'PASS' if c.ok else 'FAIL'}  {n:<{width}}  {_line(c.detail)}"
            for c, n in zip(self.checks, names, strict=True)
        ]
        summary = "all checks pass" if self.ok else f"{sum(not c.ok for c in self.checks)} failed"
        return "\n".join([f"appliance {_line(self.appliance)}: {summary}", *lines])


def _line(text: str) -> str:
    return printable(text, keep_newlines=False)


def _json(text: str) -> dict[str, Any]:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _cloud_init(facts: dict[str, Any]) -> Check:
    """Judged from /run/cloud-init/{status,result}.json, as `cloud-init status` does, or
    from the copies of the first boot's once deploy has switched cloud-init off."""
    status = _json(facts["cloud_init_status"]).get("v1", {})
    result = _json(facts["cloud_init_result"]).get("v1")
    errors = list(result.get("errors", [])) if result else []
    for stage, info in status.items():
        if isinstance(info, dict):
            errors += [f"{stage}: {e}" for e in info.get("errors", [])]
    lines = facts["cloud_init_log_tail"].splitlines()[-40:]
    tail = " | ".join(ln for ln in lines if "WARNING" in ln or "ERROR" in ln)[-600:]
    if not status:
        return Check("cloud-init", False, "has not run (no /run/cloud-init/status.json)")
    if result is None or status.get("stage"):
        return Check("cloud-init", False, f"still running (stage {status.get('stage') or 'final'})")
    if errors:
        detail = "errors: " + "; ".join(str(e) for e in errors)[:400]
        return Check("cloud-init", False, detail + (f"; log: {tail}" if tail else ""))
    if facts.get("cloud_init_off"):
        return Check("cloud-init", True, "first boot done, no errors; cloud-init is off since")
    return Check("cloud-init", True, "done, no errors")


def _wg0(site: Site, keys: Keys, facts: dict[str, Any]) -> Check:
    wg, link = facts["wg"], facts["wg_link"]
    if "error" in wg or not link:
        return Check("wg0", False, f"wg0 is not up: {wg.get('error', 'no such interface')}".strip())
    problems = []
    if "UP" not in link[0].get("flags", []):
        problems.append("link is down")
    if wg["public_key"] != keys.wg_public:
        problems.append(f"public key {wg['public_key'][:10]}... is not the site's")
    if wg["listen_port"] != site.wireguard.listen_port:
        problems.append(f"listen port {wg['listen_port']} != {site.wireguard.listen_port}")
    if link[0].get("mtu") != site.wireguard.mtu:
        problems.append(f"MTU {link[0].get('mtu')} != {site.wireguard.mtu}")
    if problems:
        return Check("wg0", False, "; ".join(problems))
    return Check(
        "wg0",
        True,
        f"up, port {wg['listen_port']}, MTU {site.wireguard.mtu}, key {keys.wg_public[:10]}...",
    )


def _family(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _nftables(site: Site, facts: dict[str, Any]) -> Check:
    nft = facts["nft"]
    if nft["rc"] != 0:
        return Check("nftables", False, f"nft list ruleset failed: {nft['err'].strip()[:200]}")
    text = nft["out"]
    want = {
        "appliance table": "table inet wg_appliance",
        "listen port open": f"udp dport {site.wireguard.listen_port} accept",
        **{
            f"SSH from LAN {n}": f"{_family(n.version)} saddr {n} tcp dport 22 accept"
            for n in site.lan.networks
        },
        "forward from wg0": 'iifname "wg0" accept',
        "MSS clamping": "tcp option maxseg size set rt mtu",
    }
    if site.metrics.enabled:
        want["metrics port"] = f"tcp dport {site.metrics.port} accept"
    missing = [label for label, rule in want.items() if rule not in text]
    masq = "masquerade" in text
    if site.wireguard.mode == "masquerade" and not masq:
        missing.append("masquerade rule")
    if site.wireguard.mode == "routed" and masq:
        missing.append("no masquerade in routed mode")
    if missing:
        return Check("nftables", False, "missing: " + ", ".join(missing))
    return Check("nftables", True, f"ruleset for {site.wireguard.mode} mode")


def _metrics(site: Site, facts: dict[str, Any]) -> Check:
    """On as the site says; when on, the exporter answered the probe's own scrape with a
    line for every live peer."""
    m = facts.get("metrics") or {}
    enabled = bool(m.get("enabled"))
    if not site.metrics.enabled:
        if enabled:
            return Check("metrics", False, "the exporter is enabled, the site says off: run sync")
        return Check("metrics", True, "off")
    if not enabled:
        return Check("metrics", False, "the exporter is not enabled: run sync")
    scrape = m.get("scrape") or {}
    where = f"{site.lan.address.ip}:{site.metrics.port}"
    if scrape.get("status") != 200:
        said = scrape.get("error") or f"HTTP {scrape.get('status')}"
        return Check(
            "metrics",
            False,
            f"{where} does not answer: {said}; on the appliance: "
            "journalctl -u wg-appliance-metrics",
        )
    live = len(facts["wg"].get("peers", []))
    if scrape.get("peers") != live:
        return Check("metrics", False, f"{where} shows {scrape.get('peers')} peers, wg0 has {live}")
    allow = ", ".join(str(n) for n in site.metrics.allow)
    return Check(
        "metrics",
        True,
        f"http://{where}/metrics answers, {live} peers in {scrape.get('seconds', 0):.2f}s, "
        f"open to {allow}",
    )


def _lan(site: Site, facts: dict[str, Any]) -> Check:
    """lan0 holds the rendered addresses (static, so exactly those) and a default route per
    gateway: with IPv6, the appliance is a gateway of both families."""
    have = set((facts.get("addresses") or {}).get("lan0", []))
    missing = [f"address {a}" for a in site.lan.addresses if str(a) not in have]
    defaults = lan_gateways(facts["routes"])
    missing += [
        f"IPv{g.version} default route via {g}" for g in site.lan.gateways if str(g) not in defaults
    ]
    if missing:
        why = "lan0 has no " + ", no ".join(missing)
        return Check("LAN", False, why + "; a new VM brings it: upgrade or deploy --replace")
    via = ", ".join(str(g) for g in site.lan.gateways)
    return Check("LAN", True, f"lan0 {', '.join(map(str, site.lan.addresses))}, default via {via}")


def _routes(site: Site, facts: dict[str, Any]) -> Check:
    have = {(r.get("dst"), r.get("dev")) for r in facts["routes"]}
    nets = [n for p in site.peers if p.active for n in p.networks]
    missing = [str(n) for n in nets if (str(n), "wg0") not in have]
    if missing:
        return Check("routes", False, "no route via wg0 for " + ", ".join(missing))
    return Check(
        "routes", True, f"{len(nets)} site network(s) via wg0" if nets else "no site networks"
    )


def _handshakes(
    site: Site, keys: Keys, facts: dict[str, Any], required: set[str], only_required: bool
) -> list[Check]:
    now = facts["time"]
    live = {p["public_key"]: p for p in facts["wg"].get("peers", [])}
    checks = []
    for p in site.peers:
        if not p.active:
            continue
        h = live.get(keys.peers[p.name].public)
        last = h["latest_handshake"] if h else 0
        age = now - last if last else None
        fresh = age is not None and age <= HANDSHAKE_FRESH_S
        must = p.name in required or (not only_required and p.is_site and p.endpoint is not None)
        if age is None:
            detail = "no handshake yet"
        else:
            detail = f"last handshake {age:.0f}s ago" + ("" if fresh else " (stale)")
        if not must:
            detail += " (informational)"
        checks.append(Check(f"handshake {p.name}", fresh or not must, detail))
    return checks


def _peers_ok(site: Site) -> str:
    active = sum(1 for p in site.peers if p.active)
    off = len(site.peers) - active
    return f"{active} peers as in the site file" + (
        f", {off} disabled or expired and absent" if off else ""
    )


def _timer(facts: dict[str, Any]) -> Check:
    """The appliance's own timer: without it expiries and endpoint names wait for a sync."""
    state = facts.get("peers_timer")
    if state is None:
        return Check("peer timer", True, "not reported by this agent (informational)")
    ok = state == "active"
    detail = "expiry and endpoint names every 10 s" if ok else f"timer is {state or 'missing'}"
    return Check("peer timer", ok, detail + ("" if ok else "; run `wg-appliance sync`"))


def _resources(facts: dict[str, Any], local_time: float) -> Check:
    problems = []
    if facts["disk_free"] < 100e6:
        problems.append(f"disk nearly full ({facts['disk_free'] / 1e6:.0f} MB free)")
    if facts["mem_available"] < 32e6:
        problems.append(f"memory low ({facts['mem_available'] / 1e6:.0f} MB available)")
    skew = facts["time"] - local_time
    if abs(skew) > 120:
        problems.append(f"clock off by {skew:+.0f}s")
    detail = (
        f"disk {facts['disk_free'] / 1e6:.0f}/{facts['disk_total'] / 1e6:.0f} MB free, "
        f"memory {facts['mem_available'] / 1e6:.0f}/{facts['mem_total'] / 1e6:.0f} MB available, "
        f"clock skew {skew:+.1f}s"
    )
    return Check("resources", not problems, "; ".join(problems) if problems else detail)


def evaluate(
    site: Site,
    keys: Keys,
    facts: dict[str, Any],
    local_time: float,
    required: set[str] = frozenset(),
    only_required: bool = False,
) -> Report:
    """Pure: the site, its keys and the guest's facts in, the checks out. `only_required`:
    handshakes count for the `required` peers only (after a takeover: the branches that were
    up before it), not for every site peer with an endpoint."""
    drift = peer_drift(site, keys, facts["wg"].get("peers", []))
    v4 = facts["ip_forward"] == "1"
    v6 = facts["ip6_forward"] == "1" or not site.uses_ipv6
    gw = facts["gateway"] or {"ok": False, "detail": "not probed"}
    gateway6 = site.lan.gateway_for(6)
    gw6 = facts.get("gateway6") or {"ok": False, "detail": "not probed"}
    checks = [
        Check("ssh", True, f"{site.ssh.user}@{site.lan.address.ip}, host key pinned"),
        _cloud_init(facts),
        _wg0(site, keys, facts),
        Check(
            "peers",
            not drift,
            "; ".join(drift) if drift else _peers_ok(site),
        ),
        _timer(facts),
        Check(
            "forwarding",
            v4 and v6,
            "IPv4" + (" and IPv6" if v6 else "") + " forwarding on"
            if v4 and v6
            else f"ip_forward={facts['ip_forward']} ipv6 forwarding={facts['ip6_forward']}",
        ),
        _nftables(site, facts),
        _lan(site, facts),
        _routes(site, facts),
        _metrics(site, facts),
        Check("gateway", gw["ok"], f"{site.lan.gateway}: {gw['detail']}"),
        *(
            [Check("gateway IPv6", gw6["ok"], f"{gateway6}: {gw6['detail']}")]
            if gateway6 is not None and gateway6 != site.lan.gateway
            else []
        ),
        *_handshakes(site, keys, facts, set(required), only_required),
        _resources(facts, local_time),
    ]
    return Report(site.name, tuple(checks))


# What a staged appliance cannot pass with its link down, or what only SSH shows: judged
# after the takeover instead.
LINK_CHECKS = ("gateway", "gateway IPv6", "ssh")


def before_takeover(report: Report) -> list[Check]:
    """The failing checks that stop an upgrade before the new appliance takes over: all but
    those that need the link, and handshakes (peers reach only the serving appliance)."""
    return [
        c
        for c in report.checks
        if not c.ok and c.name not in LINK_CHECKS and not c.name.startswith("handshake ")
    ]


def fresh_site_peers(site: Site, keys: Keys, status: dict[str, Any]) -> set[str]:
    """Site peers (those with networks) whose handshake on the serving appliance is fresh:
    the branches whose tunnels must be up again after a takeover. Road warriors are left
    out: a sleeping phone must not stop an upgrade."""
    now = status.get("time", 0)
    live = {p.get("public_key"): p for p in (status.get("wg") or {}).get("peers", [])}
    out = set()
    for p in site.peers:
        h = live.get(keys.peers[p.name].public) if p.active and p.is_site else None
        if h and h.get("latest_handshake") and now - h["latest_handshake"] <= HANDSHAKE_FRESH_S:
            out.add(p.name)
    return out
