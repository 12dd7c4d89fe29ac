"""The figures of `make bench`: each function returns {name: value} and cleans up after itself."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.image.build import build_image, default_cache_dir
from builder.progress import Progress
from tests.lab.boot import (
    CLOUD_INIT_DONE,
    GUEST_ADDRESS,
    GUEST_DNS,
    GUEST_GATEWAY,
    GUEST_MAC,
    measure_bare,
    measure_boot,
    measure_kernel_to_init,
)

ROOT = Path(__file__).resolve().parent.parent


def big_site(path: Path, peers: int, endpoint: str = "vpn.example.org:51820") -> Path:
    """A site with `peers` road warriors in a /16, written as TOML."""
    lines = (ROOT / "examples" / "site.toml").read_text().split("[[peers]]")[0]
    lines = lines.replace('["10.77.0.1/24", "fd77::1/64"]', '["10.100.0.1/16"]')
    lines = lines.replace('"vpn.example.org:51820"', f'"{endpoint}"')
    body = [lines]
    for i in range(peers):
        body.append(
            f'[[peers]]\nname = "p{i}"\naddress = "10.100.{2 + i // 250}.{1 + i % 250}/32"\n'
        )
    path.write_text("\n".join(body))
    return path


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def render_1000() -> dict[str, float]:
    """Whole-process render of a 1000-peer site: first run (makes keys) and a re-run."""
    with tempfile.TemporaryDirectory() as d:
        site = big_site(Path(d) / "site.toml", 1000)
        cmd = [sys.executable, "-m", "builder", "render", "--site", str(site), "--out", f"{d}/out"]
        baseline = min(timed([sys.executable, "-c", "pass"]) for _ in range(3))
        first = timed(cmd)
        again = min(timed(cmd) for _ in range(3))
    return {
        "render_1000_peers_first_s": round(first, 3),
        "render_1000_peers_rerun_s": round(again, 3),
        "python_startup_baseline_s": round(baseline, 3),
        "render_1000_peers_ratio_to_python_startup": round(again / baseline, 1),
    }


def image() -> dict[str, float]:
    """Cold build into an empty cache, then the cache hit; size of the compressed qcow2;
    first boot to cloud-init done beside the bare kernel-to-init time of the same image."""
    quiet = Progress(quiet=True)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        img = build_image(cache=Path(d), progress=quiet)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_image(cache=Path(d), progress=quiet)
        hit = time.perf_counter() - t0
        size = img.size
    img = build_image(cache=default_cache_dir(), progress=quiet)
    figures: dict = {
        "image_qcow2_mb": round(size / 1e6, 1),
        "image_cold_build_s": round(cold, 1),
        "image_cache_hit_s": round(hit, 3),
    }
    for vcpus in (1, 2):
        figures.update(first_boot(img, vcpus))
    return figures


def appliance_seed(folder: Path) -> dict[str, str]:
    """The seed `deploy` makes for the example site (its 3 peers, metrics on), with the LAN
    moved onto qemu's user-mode network; keys in a state folder under `folder`."""
    from builder.local.state import State
    from builder.model.site import load_site
    from builder.render.appliance import render_seed

    text = (ROOT / "examples" / "site.toml").read_text()
    for old, new in [
        ('["192.168.77.50/24", "fd77:77::50/64"]', f'["{GUEST_ADDRESS}"]'),
        ('["192.168.77.1", "fd77:77::1"]', f'["{GUEST_GATEWAY}"]'),
        ('dns = ["192.168.77.1"]', f'dns = ["{GUEST_DNS}"]'),
        ('# mac = "02:00:00:00:00:01"', f'mac = "{GUEST_MAC}"'),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    (folder / "site.toml").write_text(text)
    site = load_site(folder / "site.toml")
    return render_seed(site, State(folder / "state").keys_for(site))


# First boots under TCG vary by a tenth or more between runs of the same image, the bare boot
# as much: pairs are alternated and the medians reported, with the spread beside them.
BOOT_RUNS = 3


def first_boot(img, vcpus: int, runs: int = BOOT_RUNS) -> dict:
    """The bare boot (the image's kernel, initramfs and disk with `init=/bin/true`, until qemu
    exits) and first boots of the same image with `vcpus`, alternated `runs` times in one run:
    from the seed deploy makes for the example site (the figure the goal is set on); once from
    a minimal seed (host name, host key type, the LAN) beside it. The ratio is the median wall
    time to both cloud-init done and SSH answering over the median bare boot; the kernel's own
    time to the initramfs' init is shown beside it, and the blame lists are the median boot's."""
    with tempfile.TemporaryDirectory() as d:
        k2i = measure_kernel_to_init(img, Path(d), vcpus=vcpus)
    bares, boots = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            bares.append(measure_bare(img, Path(d), vcpus=vcpus))
        with tempfile.TemporaryDirectory() as d:
            boots.append(measure_boot(img, Path(d), vcpus=vcpus, seed=appliance_seed(Path(d))))
    with tempfile.TemporaryDirectory() as d:
        minimal = measure_boot(img, Path(d), vcpus=vcpus)
    readies = [max(b.done_wall, b.ssh_wall) for b in boots]
    boot = boots[readies.index(statistics.median_high(readies))]
    bare, ready = statistics.median(bares), statistics.median(readies)
    minimal_ready = max(minimal.done_wall, minimal.ssh_wall)
    tag = f"{vcpus}cpu"
    return {
        f"kernel_to_init_{tag}_s": round(k2i, 2),
        f"bare_boot_{tag}_wall_s": round(bare, 2),
        f"bare_boot_{tag}_wall_s_runs": [round(b, 2) for b in bares],
        f"boot_to_cloud_init_done_{tag}_uptime_s": round(boot.cloud_init_done, 1),
        f"boot_to_cloud_init_done_{tag}_wall_s": statistics.median(b.done_wall for b in boots),
        f"boot_to_ssh_answer_{tag}_wall_s": statistics.median(b.ssh_wall for b in boots),
        f"boot_to_ready_{tag}_wall_s_runs": readies,
        f"boot_ratio_to_bare_{tag}": round(ready / bare, 1),
        f"boot_ratio_to_bare_{tag}_runs": [
            round(r / b, 1) for r, b in zip(readies, bares, strict=True)
        ],
        f"boot_ratio_to_kernel_to_init_{tag}": round(ready / k2i, 1),
        f"systemd_blame_top5_{tag}": boot.systemd_blame,
        f"cloud_init_blame_top5_{tag}": boot.cloud_init_blame,
        f"boot_minimal_seed_to_cloud_init_done_{tag}_wall_s": minimal.done_wall,
        f"boot_minimal_seed_ratio_to_bare_{tag}": round(minimal_ready / bare, 1),
        f"systemd_blame_top5_minimal_seed_{tag}": minimal.systemd_blame,
    }


def _cli(
    lab, *args: str, timeout: float = 900, tree: Path | None = None
) -> subprocess.CompletedProcess:
    """The tool on the lab's LAN host; with `tree`, the tool of that source tree instead."""
    from tests.lab.lab import LAN_NS

    argv = [sys.executable, "-m", "builder", *args]
    return lab.exec(LAN_NS, ["env", "-C", str(tree), *argv] if tree else argv, timeout=timeout)


def _timed_cli(
    lab, *args: str, tree: Path | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = _cli(lab, *args, tree=tree)
    return time.perf_counter() - t0, r


def _best(lab, command: str, site: Path, tree: Path | None = None) -> float:
    """Whole-process seconds of a command that only looks: the best of three."""
    return min(_timed_cli(lab, command, "--site", str(site), tree=tree)[0] for _ in range(3))


def _iperf(lab, ns: str, server_ns: str, host: str) -> float:
    """Mbit/s of a 5 s TCP stream from `ns` to an iperf3 server in `server_ns`."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        out = lab.exec(ns, ["iperf3", "-c", host, "-t", "5", "-J"], timeout=60).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.kill()
        server.wait()


# deploy's progress lines ("[  12.3s] storage done in 4.5s"), by the stage names it announces.
STAGE_DONE = re.compile(r"\] (.+) done in (\d+\.\d+)s$", re.M)
STAGES = {
    "preflight": "preflight",
    "storage": "upload",
    "defining and starting": "define_start_kvm_probe",
    "waiting for SSH": "boot_to_ssh",
    "waiting for cloud-init": "cloud_init_after_ssh",
}


def deploy_stages(stderr: str) -> dict[str, float]:
    """Seconds per deploy stage, from its progress output."""
    out: dict[str, float] = {}
    for name, seconds in STAGE_DONE.findall(stderr):
        key = next((v for k, v in STAGES.items() if name.startswith(k)), None)
        if key:
            out[key] = out.get(key, 0.0) + float(seconds)
    return out


def _guest_cloud_init_done(lab, name: str) -> float:
    """The guest's uptime when cloud-init finished, from the serial log in the lab's pool."""
    log = lab.host_path(f"/var/lib/libvirt/images/wg-appliance/{name}-serial.log")
    found = CLOUD_INIT_DONE.search(log.read_text(errors="replace"))
    return float(found.group(1)) if found else float("nan")


def _deploy(lab, site: Path, img, tag: str) -> tuple[float, dict]:
    """Deploy and first verify of `site`; (deploy seconds, figures tagged `tag`) with the
    deploy's stages and the guest's own first boot."""
    deploy_s, r = _timed_cli(lab, "deploy", "--site", str(site), "--image", str(img.path))
    verify_s, _ = _timed_cli(lab, "verify", "--site", str(site))
    boot = _guest_cloud_init_done(lab, "wg-gw")
    figures = {f"deploy_{tag}_stage_{k}_s": round(v, 1) for k, v in deploy_stages(r.stderr).items()}
    figures.update({
        f"deploy_{tag}_guest_cloud_init_done_uptime_s": boot,
        f"deploy_{tag}_to_verified_s": round(deploy_s + verify_s, 1),
        f"deploy_{tag}_to_verified_beyond_first_boot_s": round(deploy_s + verify_s - boot, 1),
    })  # fmt: skip
    return deploy_s + verify_s, figures


SCRAPE = (
    "import sys, time, urllib.request\n"
    "t0 = time.perf_counter()\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=60) as r:\n"
    "    body = r.read()\n"
    "print(time.perf_counter() - t0, len(body), body.count(b'wireguard_sent_bytes_total{'))\n"
)


def _scrape(lab, url: str) -> tuple[float, int, int]:
    """(seconds, bytes, peers) of one GET of the exporter from the LAN host."""
    from tests.lab.lab import LAN_NS

    out = lab.exec(LAN_NS, [sys.executable, "-c", SCRAPE, url], timeout=120).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


@contextmanager
def _scraping(lab, url: str) -> Iterator[list[float]]:
    """Scrapes back to back in a thread while the body runs; their times in the list."""
    times: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            times.append(_scrape(lab, url)[0])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(120)


def lab() -> dict[str, float]:
    """In the lab: deploy the example's 3 peers and verify, with where the deploy's time goes;
    then the same for a 1000-peer appliance, read its status, sync one added peer into it,
    push iperf3 through the tunnel beside the same path without it, then sync it down to 3
    peers and time verify and status again. TCG figures."""
    from tests.lab import lab as L
    from tests.lab.clients import WgClient, ping
    from tests.lab.internet import RW_NS, plain_red

    img = build_image(cache=default_cache_dir(), progress=Progress(quiet=True))
    with tempfile.TemporaryDirectory() as d:
        k2i = measure_kernel_to_init(img, Path(d))
    lab = L.Lab()
    lab.up()
    client = None
    try:
        plain_red(lab, "192.168.77.50")
        with tempfile.TemporaryDirectory() as d:
            small = big_site(Path(d) / "small.toml", 3, endpoint="203.0.113.1:51820")
            small_s, figures = _deploy(lab, small, img, "3_peers")
            _cli(lab, "destroy", "--site", str(small))
        with tempfile.TemporaryDirectory() as d:
            site = big_site(Path(d) / "site.toml", 1000, endpoint="203.0.113.1:51820")
            big_s, big_figures = _deploy(lab, site, img, "1000_peers")
            figures.update(big_figures)
            verify_s = _best(lab, "verify", site)
            status_s = _best(lab, "status", site)
            sync_times = []
            for i in range(3):  # one added peer each time; the best of three
                site.write_text(
                    site.read_text()
                    + f'\n[[peers]]\nname = "extra{i}"\naddress = "10.100.9.{i + 1}/32"\n'
                )
                sync_times.append(_timed_cli(lab, "sync", "--site", str(site))[0])
            sync_s = min(sync_times)
            url = "http://192.168.77.50:9586/metrics"
            scrape_first = _scrape(lab, url)
            scrapes = [_scrape(lab, url) for _ in range(3)]
            # Direct path first: RED to GREEN through the host, no tunnel.
            lab.exec(L.INET_NS, ["ip", "route", "replace", "192.168.77.0/24", "via", "203.0.113.1"])
            direct = _iperf(lab, RW_NS, L.LAN_NS, "192.168.77.10")
            conf = _cli(lab, "peer-config", "--site", str(site), "p0").stdout
            client = WgClient(lab, RW_NS, "wgbench0")
            client.up(conf)
            ping(lab, RW_NS, "192.168.77.10")
            tunnel = _iperf(lab, RW_NS, L.LAN_NS, "192.168.77.10")
            with _scraping(lab, url) as during:
                tunnel_scraped = _iperf(lab, RW_NS, L.LAN_NS, "192.168.77.10")
            big_site(site, 3, endpoint="203.0.113.1:51820")  # the example's size, synced down
            _cli(lab, "sync", "--site", str(site))
            verify_3_s, status_3_s = _best(lab, "verify", site), _best(lab, "status", site)
    finally:
        if client is not None:
            client.down()
        lab.down()
    return {
        **figures,
        "deploy_1000_to_3_peers_ratio": round(big_s / small_s, 2),
        "deploy_to_verified_ratio_to_kernel_to_init": round(big_s / k2i, 1),
        "verify_s": round(verify_s, 2),
        "status_1000_peers_s": round(status_s, 2),
        "verify_3_peers_s": round(verify_3_s, 2),
        "status_3_peers_s": round(status_3_s, 2),
        "sync_one_peer_into_1000_s": round(sync_s, 2),
        "metrics_scrape_1000_peers_first_s": round(scrape_first[0], 2),
        "metrics_scrape_1000_peers_s": round(min(t for t, _, _ in scrapes), 2),
        "metrics_scrape_1000_peers_kb": round(scrapes[0][1] / 1e3, 1),
        "metrics_scrape_1000_peers_peers": scrapes[0][2],
        "iperf3_tunnel_while_scraping_mbit_s_tcg": round(tunnel_scraped, 1),
        "iperf3_tunnel_while_scraping_ratio": round(tunnel_scraped / tunnel, 3),
        "metrics_scrapes_during_iperf3": len(during),
        "iperf3_direct_mbit_s": round(direct, 1),
        "iperf3_tunnel_mbit_s_tcg": round(tunnel, 1),
        "iperf3_tunnel_ratio_to_direct": round(tunnel / direct, 3),
    }


# One upload of `image` as a fresh volume, timed inside the process that makes it: the
# same code deploy runs, so the two transports differ only in how bytes reach libvirtd.
UPLOAD = """
import sys, time
from pathlib import Path
from builder.model.login import access_of
from builder.model.site import Host
from builder.remote import libvirtd as lh
uri, image, fp, identity = sys.argv[1:5]
access = access_of(Host(uri=uri), "bench", host_key=fp or None, identity=Path(identity))
conn = lh.connect(uri, access)
pool = lh.ensure_pool(conn, "wgl-bench", "/var/lib/libvirt/images/wgl-bench")
t0 = time.perf_counter()
vol = lh.upload_volume(pool, "bench.qcow2", Path(image))
print(time.perf_counter() - t0)
vol.delete(0)
"""


def upload() -> dict[str, float]:
    """The base image uploaded to the lab host's libvirtd over its local socket and over SSH
    from the workstation (libssh2 through the host's sshd), best of three each, in one run."""
    from tests.lab import lab as L
    from tests.lab.host_sshd import URI, start_lab_sshd, workstation

    img = build_image(cache=default_cache_dir(), progress=Progress(quiet=True))
    lab = L.Lab()
    lab.up()
    try:
        sshd = start_lab_sshd(lab)
        local, remote = [], []
        for _ in range(3):
            argv = [sys.executable, "-c", UPLOAD, "qemu:///system", str(img.path), "", "/"]
            local.append(float(lab.exec(L.HOST_NS, argv, timeout=600).stdout))
            argv = [sys.executable, "-c", UPLOAD, URI, str(img.path), sshd.fingerprint()]
            argv.append(str(sshd.identity))
            remote.append(float(lab.exec(L.LAN_NS, workstation(argv), timeout=600).stdout))
    finally:
        lab.down()
    mb = img.size / 1e6
    return {
        "upload_base_local_s": round(min(local), 2),
        "upload_base_ssh_s": round(min(remote), 2),
        "upload_base_ssh_mb_s": round(mb / min(remote), 1),
        "upload_base_ssh_ratio_to_local": round(min(remote) / min(local), 2),
    }


def changed_recipe(where: Path) -> Path:
    """A copy of images/ with one file added: another recipe digest, so another image."""
    import shutil

    recipe = where / "images"
    shutil.copytree(ROOT / "images", recipe)
    (recipe / "rootfs" / "etc" / "wg-appliance-test-build").write_text("a changed recipe\n")
    return recipe


def _outage(lab, run, host: str) -> dict[str, float]:
    """Run `run()` while a road warrior pings `host` five times a second and the branch LAN
    keeps a TCP stream to it; both are read once pings answer again."""
    from tests.lab import lab as L
    from tests.lab.clients import Pinger, TcpStream, ping
    from tests.lab.internet import BLAN_NS, RW_NS

    pinger = Pinger(lab, RW_NS, host, seconds=1800)
    stream = TcpStream(lab, BLAN_NS, L.LAN_NS, host, seconds=1800)
    t0 = time.perf_counter()
    try:
        run()
        seconds = time.perf_counter() - t0
        ping(lab, RW_NS, host, count=1, within=300)
        ping(lab, BLAN_NS, host, count=1, within=300)
        time.sleep(2)
    finally:
        outage, _ = pinger.stop()
        stream.stop()
        streamed = stream.result(timeout=60)
    # None: the connection did not live through it (reset or timed out).
    tcp = round(streamed[0], 1) if isinstance(streamed, tuple) else None
    return {"ping_outage_s": round(outage, 1), "tcp_outage_s": tcp, "run_s": seconds}


def handover() -> dict[str, float]:
    """The outage a road warrior (pinging 5/s) and a routed branch (a TCP stream) see while
    `upgrade` moves the appliance to a new image, beside, in the same run, the stop-and-boot it
    replaces (destroy, then deploy of the other image: what `deploy --replace` did before)."""
    from tests.lab import lab as L
    from tests.lab.clients import WgClient, ping
    from tests.lab.internet import BRANCH_NS, RW_NS, plain_red

    img = build_image(cache=default_cache_dir(), progress=Progress(quiet=True))
    lab = L.Lab()
    clients: list = []
    with tempfile.TemporaryDirectory() as d:
        new = build_image(
            cache=default_cache_dir(), progress=Progress(quiet=True), recipe=changed_recipe(Path(d))
        )
        lab.up()
        try:
            plain_red(lab, "192.168.77.50")
            site = Path(d) / "site.toml"
            site.write_text(
                (ROOT / "examples" / "site.toml")
                .read_text()
                .replace('"vpn.example.org:51820"', '"203.0.113.1:51820"')
                .replace('mode = "masquerade"', 'mode = "routed"')
            )
            _cli(lab, "deploy", "--site", str(site), "--image", str(img.path))
            for dest in ("10.77.0.0/24", "192.168.88.0/24"):
                lab.exec(L.LAN_NS, ["ip", "route", "replace", dest, "via", "192.168.77.50"])
            for peer, ns, ifname in (("laptop", RW_NS, "wgbh0"), ("branch", BRANCH_NS, "wgbh1")):
                c = WgClient(lab, ns, ifname)
                c.up(_cli(lab, "peer-config", "--site", str(site), peer).stdout)
                clients.append(c)
                ping(lab, ns, "192.168.77.10")
            upgrade = _outage(
                lab,
                lambda: _cli(lab, "upgrade", "--site", str(site), "--image", str(new.path)),
                "192.168.77.10",
            )

            def stop_and_boot():
                _cli(lab, "destroy", "--site", str(site))
                _cli(lab, "deploy", "--site", str(site), "--image", str(img.path))

            boot = _outage(lab, stop_and_boot, "192.168.77.10")
            _cli(lab, "destroy", "--site", str(site))
        finally:
            for c in clients:
                c.down()
            lab.down()
    return {
        "upgrade_road_warrior_outage_s": upgrade["ping_outage_s"],
        "upgrade_branch_tcp_outage_s": upgrade["tcp_outage_s"],
        "upgrade_to_verified_s": round(upgrade["run_s"], 1),
        "stop_and_boot_road_warrior_outage_s": boot["ping_outage_s"],
        "stop_and_boot_branch_tcp_outage_s": boot["tcp_outage_s"],
        "upgrade_outage_ratio_to_stop_and_boot": round(
            upgrade["ping_outage_s"] / max(boot["ping_outage_s"], 0.2), 3
        ),
    }


# Where the time of verify, status and sync goes, measured from the workstation over one
# pinned SSH connection to the appliance: the tool's imports, loading the site and keys, the
# SSH connect, then each guest step on its own (best of three).
PHASES = """
import json, shlex, sys, time
t0 = time.perf_counter()
from pathlib import Path
from builder.local.state import State
from builder.model.site import load_site
from builder.remote import appliance as A
from builder.remote.ssh import connect, execute
out = {"imports": time.perf_counter() - t0}
t0 = time.perf_counter()
site = load_site(Path(sys.argv[1]))
keys = State.for_site(site).look(site)
out["load_site_and_keys"] = time.perf_counter() - t0
t0 = time.perf_counter()
client = connect(A.target_for(site, keys))
out["ssh_connect"] = time.perf_counter() - t0
probe = json.dumps({"gateway": str(site.lan.gateway), "metrics": A.metrics_url(site)})
steps = {
    "exec_true": ("true", ""),
    "exec_sudo_true": ("sudo -n true", ""),
    "exec_sudo_python_pass": ("sudo -n python3 -S -c pass", ""),
    "agent_status": (A.agent_command("status"), ""),
    "agent_probe": (A.agent_command("probe", probe), ""),
    "agent_sync_no_change": (A.agent_command("sync"), "\\n"),
}
# The sudo path's runner imports a kept copy, which calls through the kept agent never make.
assert execute(client, A.agent_command("status", whole=True)).rc == 0
served = {
    "served_status": (["status"], ""),
    "served_probe": (["probe", probe], ""),
    "served_sync_no_change": (["sync"], "\\n"),
}
for name, (argv, stdin) in served.items():
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = A.served(client, argv, input=stdin)
        times.append(time.perf_counter() - t0)
        assert r is not None and r.rc == 0, (name, r)
    out[name] = min(times)


def timed_exec(command):
    t0 = time.perf_counter()
    assert execute(client, command).rc == 0, command
    return time.perf_counter() - t0


for name, (command, stdin) in steps.items():
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = execute(client, command, input=stdin)
        times.append(time.perf_counter() - t0)
        assert r.rc == 0, (name, r.stderr[-300:])
    out[name] = min(times)
    out[name + "_answer_kb"] = len(r.stdout) / 1e3
out["agent_command_kb"] = len(A.agent_command("status")) / 1e3


def login_and_true():
    t0 = time.perf_counter()
    other = connect(A.target_for(site, keys))
    execute(other, "true")
    other.close()
    return time.perf_counter() - t0


# The image's two login cuts undone for a moment in this throwaway appliance, the same calls
# timed again: sudo with its PAM session, sshd's PAM with Debian's motd, mail and SELinux.
DEBIAN_PAM = "\\n".join([
    "session [success=ok ignore=ignore module_unknown=ignore default=bad] pam_selinux.so close",
    "session optional pam_motd.so motd=/run/motd.dynamic",
    "session optional pam_motd.so noupdate",
    "session optional pam_mail.so standard noenv",
    "session [success=ok ignore=ignore module_unknown=ignore default=bad] pam_selinux.so open",
])
out["login_and_true"] = min(login_and_true() for _ in range(3))
undo = ("mv /etc/sudoers.d/wg-appliance /root/wg-appliance.sudoers && cp /etc/pam.d/sshd "
        f"/root/sshd.pam && printf '{DEBIAN_PAM}\\n' >> /etc/pam.d/sshd")
redo = "mv /root/wg-appliance.sudoers /etc/sudoers.d/wg-appliance && cp /root/sshd.pam /etc/pam.d/sshd"
if execute(client, "sudo -n sh -c " + shlex.quote(undo)).rc == 0:
    try:
        out["exec_sudo_true_debian_pam_session"] = min(
            timed_exec("sudo -n true") for _ in range(3))
        out["login_and_true_debian_sshd_pam"] = min(login_and_true() for _ in range(3))
    finally:
        assert execute(client, "sudo -n sh -c " + shlex.quote(redo)).rc == 0
client.close()
print(json.dumps(out))
"""


def _phases(lab, site: Path, tag: str) -> dict[str, float]:
    from tests.lab.lab import LAN_NS

    out = lab.exec(LAN_NS, [sys.executable, "-c", PHASES, str(site)], timeout=600).stdout
    return {f"phase_{tag}_{k}_s" if not k.endswith("kb") else f"phase_{tag}_{k}": round(v, 3)
            for k, v in json.loads(out).items()}  # fmt: skip


def _add_peer(site: Path, i: int) -> None:
    site.write_text(
        site.read_text() + f'\n[[peers]]\nname = "extra{i}"\naddress = "10.100.9.{i + 1}/32"\n'
    )


@contextmanager
def _baseline() -> Iterator[Path | None]:
    """The source tree of WG_BENCH_BASELINE (a git revision), to time the same commands of an
    earlier version in the same appliance; None when it is not set."""
    rev = os.environ.get("WG_BENCH_BASELINE")
    if not rev:
        yield None
        return
    with tempfile.TemporaryDirectory() as d:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
        assert archive.returncode == 0, archive.stderr.decode()
        subprocess.run(["tar", "-x", "-C", d], input=archive.stdout, check=True)
        yield Path(d)


def _looking(lab, site: Path, tag: str, trees: dict[str, Path | None]) -> dict[str, float]:
    """verify and status of each tree, the best of three."""
    out = {}
    for suffix, tree in trees.items():
        out[f"verify_{tag}_s{suffix}"] = _best(lab, "verify", site, tree)
        out[f"status_{tag}_s{suffix}"] = _best(lab, "status", site, tree)
    return out


def speed() -> dict[str, float]:
    """The whole-process times of verify, status and sync in one 1000-peer appliance (and
    synced down to 3 peers), each the best of three, with where their time goes. With
    WG_BENCH_BASELINE=REV, the same commands of that revision beside them (`_before`, and
    the ratio now/before), each tree's calls in a row so each finds its own agent kept."""
    from tests.lab import lab as L

    img = build_image(cache=default_cache_dir(), progress=Progress(quiet=True))
    lab = L.Lab()
    lab.up()
    figures: dict[str, float] = {}
    added = iter(range(100))
    try:
        with tempfile.TemporaryDirectory() as d, _baseline() as before:
            trees = {"": None} if before is None else {"_before": before, "": None}
            site = big_site(Path(d) / "site.toml", 1000, endpoint="203.0.113.1:51820")
            r = _cli(lab, "deploy", "--site", str(site), "--image", str(img.path))
            assert r.returncode == 0, r.stderr[-2000:]
            _cli(lab, "verify", "--site", str(site))
            for suffix, tree in trees.items():
                figures.update(_looking(lab, site, "1000", {suffix: tree}))
                figures[f"sync_no_change_1000_s{suffix}"] = _best(lab, "sync", site, tree)
                said = _cli(lab, "sync", "--dry-run", "--site", str(site), tree=tree).stdout
                print(f"   sync --dry-run after the no-change syncs{suffix}: {said.strip()}")
                times = []
                for _ in range(3):
                    _add_peer(site, next(added))
                    t, r = _timed_cli(lab, "sync", "--site", str(site), tree=tree)
                    assert r.returncode == 0, r.stderr[-2000:]
                    times.append(t)
                figures[f"sync_one_peer_into_1000_s{suffix}"] = min(times)
            figures.update(_phases(lab, site, "1000"))
            big_site(site, 3, endpoint="203.0.113.1:51820")
            _cli(lab, "sync", "--site", str(site))
            figures.update(_looking(lab, site, "3", trees))
            figures.update(_phases(lab, site, "3"))
            _cli(lab, "destroy", "--site", str(site))
    finally:
        lab.down()
    out = {k: round(v, 2) if not k.startswith("phase") else v for k, v in figures.items()}
    for key in [k for k in out if k.endswith("_before")]:
        now = out[key.removesuffix("_before")]
        out[key.removesuffix("_s_before") + "_ratio_to_before"] = round(now / out[key], 2)
    # The names the goals are set on.
    out["verify_s"] = out["verify_1000_s"]
    out["status_1000_peers_s"] = out["status_1000_s"]
    out["verify_3_peers_s"] = out["verify_3_s"]
    out["status_3_peers_s"] = out["status_3_s"]
    return out


ALL = [render_1000, image, upload, lab, handover]
BY_NAME = {fn.__name__: fn for fn in [*ALL, speed]}
