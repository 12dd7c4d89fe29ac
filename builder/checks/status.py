"""What `status` shows: the live peers by their site-file names, with handshake ages, bytes
and rates, under a header of what the guest knows of itself. Pure: facts in, a view out;
builder/status.py reads the appliance, cli.py prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from builder.checks.drift import peer_drift
from builder.model.keys import Keys
from builder.model.site import Peer, Site, expiry_text
from builder.text import printable

LIVE, MISSING, UNKNOWN = "live", "missing", "unknown"
DISABLED, EXPIRED = "disabled", "expired"  # in the site, rightly absent from wg0


@dataclass(frozen=True)
class PeerStatus:
    name: str | None  # None: on wg0 but not in the site file
    public_key: str
    # LIVE, MISSING (in the site, not on wg0), UNKNOWN (on wg0, not in the site), or DISABLED
    # or EXPIRED (in the site, rightly not on wg0)
    state: str
    endpoint: str | None
    latest_handshake: int | None  # Unix seconds; None: never
    handshake_age_s: float | None
    rx_bytes: int
    tx_bytes: int
    rx_rate: float | None  # bytes/s since the previous reading; None without one
    tx_rate: float | None
    enabled: bool = True
    expired: bool = False
    expires: str | None = None  # UTC, e.g. 2026-12-31T00:00:00Z; None: never


@dataclass(frozen=True)
class Status:
    appliance: dict[str, Any]
    peers: tuple[PeerStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"appliance": self.appliance, "peers": [asdict(p) for p in self.peers]}

    def table(self) -> str:
        """The header and one line per peer; every value the guest sent is escaped."""
        rates = any(p.rx_rate is not None for p in self.peers)
        expiry = any(p.expires for p in self.peers)
        head = ["NAME", "ENDPOINT", "HANDSHAKE", "RECEIVED", "SENT"]
        rows = [_row(p, rates, expiry) for p in self.peers]
        if rates:
            head += ["RX/s", "TX/s"]
        if expiry:
            head += ["EXPIRES"]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [header(self.appliance)]
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return "\n".join(lines)


def _line(text: str) -> str:
    return printable(text, keep_newlines=False)


NOTES = {MISSING: " (missing on the appliance)", DISABLED: " (disabled)", EXPIRED: " (expired)"}


def _row(p: PeerStatus, rates: bool, expiry: bool = False) -> list[str]:
    if p.state == UNKNOWN:
        name = f"{_line(p.public_key)} (unknown)"
    else:
        name = f"{p.name}{NOTES.get(p.state, '')}"
        if p.state == LIVE and not (p.enabled and not p.expired):
            name += (
                " (disabled in the site, still on wg0)"
                if not p.enabled
                else " (expired, still on wg0)"
            )
    row = [
        name,
        _line(p.endpoint) if p.endpoint else "-",
        age(p.handshake_age_s),
        human_bytes(p.rx_bytes),
        human_bytes(p.tx_bytes),
    ]
    if rates:
        row += [_rate(p.rx_rate), _rate(p.tx_rate)]
    if expiry:
        row += [p.expires or "-"]
    return row


def _rate(value: float | None) -> str:
    return "-" if value is None else human_bytes(value) + "/s"


def header(a: dict[str, Any]) -> str:
    """One line: name, address, uptime, OS, kernel, image (its recipe digest, short), and
    whether wg0 matches the site."""
    if a["drift"]:
        match = f"{a['drift']} difference(s) from the site file"
    else:
        match = "peers as in the site file"
    wg0 = "" if a["wg0_error"] is None else f", wg0 not up: {_line(a['wg0_error'])}"
    return (
        f"{a['name']} at {a['address']}: up {duration(a['uptime_s'])}, "
        f"{_line(a['os'] or 'unknown OS')}, kernel {_line(a['kernel'])}, "
        f"image {_line((a.get('image') or 'unknown')[:12])}, {match}{wg0}"
    )


def age(seconds: float | None) -> str:
    """How long ago, as an admin reads it: '12 s ago', '5 min ago', 'never'."""
    if seconds is None:
        return "never"
    return f"{duration(seconds)} ago"


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def human_bytes(n: float) -> str:
    """Binary units with one decimal above bytes: '0 B', '1.5 KiB', '3.2 GiB'."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _rates(
    pub: str, rx: int, tx: int, now: float, previous: Status | None
) -> tuple[float | None, float | None]:
    """Bytes per second since the previous reading; None when there is none to compare
    or the counters went back (wg0 restarted)."""
    if previous is None:
        return None, None
    before = next((p for p in previous.peers if p.public_key == pub), None)
    span = now - previous.appliance["time"]
    if before is None or span <= 0 or rx < before.rx_bytes or tx < before.tx_bytes:
        return None, None
    return (rx - before.rx_bytes) / span, (tx - before.tx_bytes) / span


def _peer(
    site_peer: Peer | None, pub: str, live: dict | None, now: float, previous: Status | None
) -> PeerStatus:
    name = None if site_peer is None else site_peer.name
    if site_peer is None:
        state = UNKNOWN
    elif live:
        state = LIVE
    elif not site_peer.enabled:
        state = DISABLED
    elif site_peer.expired:
        state = EXPIRED
    else:
        state = MISSING
    live = live or {"endpoint": None, "latest_handshake": 0, "rx": 0, "tx": 0}
    last = live["latest_handshake"] or None
    rx, tx = live["rx"], live["tx"]
    rx_rate, tx_rate = _rates(pub, rx, tx, now, previous)
    return PeerStatus(
        name=name,
        public_key=pub,
        state=state,
        endpoint=live["endpoint"],
        latest_handshake=last,
        handshake_age_s=None if last is None else max(0.0, now - last),
        rx_bytes=rx,
        tx_bytes=tx,
        rx_rate=rx_rate,
        tx_rate=tx_rate,
        enabled=site_peer is None or site_peer.enabled,
        expired=site_peer is not None and site_peer.expired,
        expires=None if site_peer is None else expiry_text(site_peer.expires) or None,
    )


def view(site: Site, keys: Keys, facts: dict[str, Any], previous: Status | None = None) -> Status:
    """The site's peers in its order, then wg0's peers the site does not know; ages from the
    guest's own clock, so a skewed workstation clock does not age them."""
    wg = facts["wg"]
    live_peers = wg.get("peers", [])
    live = {p["public_key"]: p for p in live_peers}
    now = facts["time"]
    peers = []
    for p in site.peers:
        pub = keys.peers[p.name].public
        peers.append(_peer(p, pub, live.pop(pub, None), now, previous))
    peers += [_peer(None, pub, h, now, previous) for pub, h in live.items()]
    drift = peer_drift(site, keys, live_peers)
    appliance = {
        "name": site.name,
        "address": str(site.lan.address.ip),
        "time": now,
        "uptime_s": facts["uptime"],
        "os": facts.get("os", ""),
        "kernel": facts.get("kernel", ""),
        "image": facts.get("image") or None,
        "wg0_error": wg.get("error"),
        "public_key": wg.get("public_key"),
        "listen_port": wg.get("listen_port"),
        "peers_live": len(live_peers),
        "drift": len(drift),
        "drift_details": drift,
    }
    return Status(appliance, tuple(peers))
