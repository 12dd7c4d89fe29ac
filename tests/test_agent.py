"""The guest side of `sync` against a fake appliance: apply, and the rollback after a failure
at any step (the real thing runs in tests/test_e2e.py, where failures are forced in the VM)."""

from __future__ import annotations

import copy
import ipaddress
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.guest import agent as ga

WG = ga.FILES["wg0.conf"][0]
NFT = ga.FILES["nftables.conf"][0]
SYSCTL = ga.FILES["sysctl"][0]
EXPORTER = ga.FILES["metrics.py"][0]
UNIT = ga.FILES["metrics.service"][0]
SOCKET = ga.FILES["metrics.socket"][0]
NAMES = ga.FILES["names.json"][0]
FWD4 = "/proc/sys/net/ipv4/ip_forward"
FWD6 = "/proc/sys/net/ipv6/conf/all/forwarding"

OLD_WG = "[Interface]\nAddress = 10.77.0.1/24\nMTU = 1420\nPrivateKey = old=\n"
NEW_WG = (
    "[Interface]\nAddress = 10.77.0.1/24\nMTU = 1380\nPrivateKey = new=\n"
    "[Peer]\nPublicKey = branch=\nAllowedIPs = 10.77.0.10/32, 192.168.88.0/24\n"
)
NEW = {
    "wg0.conf": NEW_WG,
    "nftables.conf": "flush ruleset\ntable inet new {}\n",
    "sysctl": "# forwarding\nnet.ipv4.ip_forward = 1\nnet.ipv6.conf.all.forwarding = 1\n",
    "metrics.py": "print('new exporter')\n",
    "metrics.service": "[Service]\nExecStart=new\n",
    "metrics.socket": "[Socket]\nListenStream=new\n",
    "names.json": '{"branch=": "branch"}\n',
    "peers.json": '{"dns": [], "peers": []}\n',
    "agent": "# the agent\n",
    "peers.service": "[Service]\n",
    "peers.timer": "[Timer]\n",
    "agent.service": "[Service]\nExecStart=agent serve\n",
    "agent.socket": "[Socket]\n",
    "resolv.conf": "nameserver 192.168.88.1\n",
    "mtu": 1380,
    "metrics": True,
}


def entry(text: str, mode: int = 0o644) -> dict:
    return {"data": text.encode(), "mode": mode, "uid": 0, "gid": 0}


class FakeSystem:
    """The appliance as guest_apply sees it: files (with /proc/sys and wg0's MTU among
    them), the live ruleset, peers and routes. Operation number `fail_at` (counting every
    command, write and remove) raises `error`; with `fail_on`, every operation whose words
    start so raises it."""

    def __init__(self, files: dict, fail_at: int | None = None, fail_on=(), error=None):
        self.files = files
        self.live = {"ruleset": "table inet old {}\n", "peers": "[Interface]\nold\n"}
        self.routes = {"192.168.99.0/24"}
        # The exporter's socket: enabled, and the unit file it listens by (None: stopped).
        self.exporter = {"enabled": False, "listening": None}
        # The exporter itself, started by a scrape: the unit and program it runs, or None.
        # Not part of state(): a rollback may leave it for the next scrape to start.
        self.process = None
        # The unit files systemd has loaded: what was on disk at its last reload.
        self.loaded = self._unit_files()
        self.fail_at, self.fail_on = fail_at, tuple(fail_on)
        self.error = error or ga.Failed("injected")
        self.ops: list[tuple] = []

    def state(self):
        return copy.deepcopy((self.files, self.live, self.routes, self.exporter))

    def _op(self, *words):
        self.ops.append(words)
        if len(self.ops) - 1 == self.fail_at or (
            self.fail_on and words[: len(self.fail_on)] == self.fail_on
        ):
            raise self.error

    def read(self, path):
        return copy.deepcopy(self.files.get(path))

    def write(self, path, data, mode, owner=(0, 0)):
        self._op("write", path)
        self.files[path] = {"data": data, "mode": mode, "uid": owner[0], "gid": owner[1]}

    def remove(self, path):
        self._op("remove", path)
        self.files.pop(path, None)

    def enabled(self, unit):
        assert unit == ga.METRICS_UNIT
        return self.exporter["enabled"]

    def run(self, *argv, input=None):
        self._op(*argv)
        handler = getattr(self, "_" + "_".join(argv[:2]).replace("-", ""), None)
        assert handler, f"unexpected command {argv}"
        return handler(list(argv[2:]), input) or ""

    def run_both(self, first, second, input=None):
        self.run(*first)
        self.run(*second, input=input)

    def set_sysctl(self, path, value):
        self._op("sysctl", path, value)
        if not os.path.dirname(path).startswith("/proc/sys/net/"):
            raise OSError(2, "No such file or directory")
        self.files[path] = entry(value + "\n")

    def _nft_file(self, args, input):
        text = input if args[0] == "/dev/stdin" else self.files[args[0]]["data"].decode()
        self.live["ruleset"] = text.removeprefix("flush ruleset\n")

    def _nft_list(self, args, _):
        return self.live["ruleset"]

    def _wg_syncconf(self, args, input):
        assert "MTU" not in input and "Address" not in input, "wg-quick keys must be stripped"
        self.live["peers"] = input

    def _wg_showconf(self, args, _):
        return self.live["peers"]

    def _wg_show(self, args, _):
        nets = [
            n.strip()
            for line in self.live["peers"].splitlines()
            if line.startswith("AllowedIPs")
            for n in line.split("=", 1)[1].split(",")
        ]
        return "peer=\t" + (" ".join(nets) or "(none)") + "\n"

    def _ip_j(self, args, input):
        if args[0] == "-batch":
            return "\n".join(self._ip_j(line.split(), None) for line in input.splitlines())
        if args[:2] == ["addr", "show"]:
            return json.dumps([{"addr_info": [{"local": "10.77.0.1", "prefixlen": 24}]}])
        assert args[:4] == ["route", "show", "table", "all"], args
        # Another table's route names its table: not one of wg0's main routes.
        shown = [{"dst": "10.200.0.0/24", "table": "100"}]
        for net in map(ipaddress.ip_network, sorted(self.routes)):
            host = net.prefixlen == net.max_prefixlen
            shown.append({"dst": str(net.network_address) if host else str(net)})
        return json.dumps(shown)

    def _unit_file(self, args):
        for unit in (a for a in args if not a.startswith("-")):
            assert unit in (ga.METRICS_UNIT, ga.METRICS_SERVICE), args
            if "/etc/systemd/system/" + unit not in self.files:
                raise ga.Failed(f"Unit file {unit} does not exist.")

    def _unit_files(self) -> dict:
        return {p: f["data"] for p, f in self.files.items() if p.startswith("/etc/systemd/")}

    def _systemctl_daemonreload(self, args, _):
        self.loaded = self._unit_files()

    def _stale(self, args):
        """A unit is started with what systemd loaded: a file changed since then is a bug."""
        for unit in (a for a in args if not a.startswith("-")):
            path = "/etc/systemd/system/" + unit
            if self.files.get(path, {}).get("data") != self.loaded.get(path):
                raise AssertionError(f"{unit} started without a reload after it changed")

    def _systemctl_enable(self, args, _):
        assert "--no-reload" in args, "each reload costs seconds: apply() makes the one"
        if args[-1] != ga.METRICS_UNIT:
            return  # the peer timer's units
        self._unit_file(args)
        assert self.exporter["listening"], "an enabled socket is one that was started"
        self.exporter["enabled"] = True

    def _systemctl_disable(self, args, _):
        self._unit_file(args)
        assert "--now" in args, args
        if ga.METRICS_UNIT in args:
            self.exporter = {"enabled": False, "listening": None}
        self.process = None

    def _systemctl_restart(self, args, _):
        self._stale(args)
        assert args == [ga.METRICS_UNIT], args
        self._unit_file(args)
        assert self.process is None, "the exporter holds the old program or the port"
        self.exporter["listening"] = self.files[SOCKET]["data"]

    def _systemctl_start(self, args, _):
        self._stale(args)
        if args[-1] != ga.METRICS_UNIT:
            return  # the peer timer and the agent's socket
        self._unit_file(args)
        if self.exporter["listening"] is None:
            self.exporter["listening"] = self.files[SOCKET]["data"]

    def scrape(self):
        """A scrape of a listening socket starts the exporter with the files on disk."""
        if self.exporter["listening"] is not None and self.process is None:
            self.process = (self.files[UNIT]["data"], self.files[EXPORTER]["data"])

    def _ip_link(self, args, _):
        self.files[ga.MTU_PATH] = entry(args[-1] + "\n")

    def _ip_route(self, args, _):
        if args[0] == "replace":
            self.routes.add(args[1])
        else:
            self.routes.remove(args[1])


def guest(absent=(), exporter_on=False, **kwargs) -> FakeSystem:
    files = {
        WG: entry(OLD_WG, 0o600),
        NFT: entry("flush ruleset\ntable inet old {}\n"),
        SYSCTL: entry("net.ipv4.ip_forward = 1\n"),
        FWD4: entry("1\n"),
        FWD6: entry("0\n"),
        ga.MTU_PATH: entry("1420\n"),
        EXPORTER: entry("print('old exporter')\n"),
        UNIT: entry("[Service]\nExecStart=old\n"),
        SOCKET: entry("[Socket]\nListenStream=old\n"),
        NAMES: entry("{}\n"),
        # The timer's and the agent's units as NEW has them: a sync that leaves them reloads
        # nothing.
        **{ga.FILES[k][0]: entry(NEW[k]) for k in ga.UNITS},
    }
    for path in absent:
        del files[path]
    system = FakeSystem(files, **kwargs)
    if WG in files:
        system.live["peers"] = ga.strip(OLD_WG)
    if exporter_on:
        assert UNIT in files and EXPORTER in files and SOCKET in files
        system.exporter = {"enabled": True, "listening": files[SOCKET]["data"]}
        system.scrape()
    return system


def run(system: FakeSystem, request=NEW) -> dict:
    return ga.outcome(json.dumps(request), system)


def test_apply_changes_all_of_it():
    system = guest()
    out = run(system)
    assert out == {
        "ok": True,
        "rolled_back": False,
        "untouched": False,
        "error": "",
        "routes_added": ["192.168.88.0/24"],
        "routes_removed": ["192.168.99.0/24"],
    }
    assert system.files[WG] == entry(NEW_WG, 0o600)
    assert system.files[SYSCTL]["data"] == NEW["sysctl"].encode()
    assert system.files[FWD6]["data"] == b"1\n"
    assert system.files[ga.MTU_PATH]["data"] == b"1380\n"
    assert system.live["ruleset"] == "table inet new {}\n"
    assert system.live["peers"] == ga.strip(NEW_WG)
    assert system.routes == {"192.168.88.0/24"}
    assert system.exporter == {"enabled": True, "listening": NEW["metrics.socket"].encode()}
    assert system.process is None, "the exporter starts at the first scrape"
    system.scrape()
    assert system.process == (NEW["metrics.service"].encode(), NEW["metrics.py"].encode())


def test_metrics_off_stops_and_disables_the_exporter():
    system = guest(exporter_on=True)
    assert run(system, {**NEW, "metrics": False})["ok"]
    assert system.exporter == {"enabled": False, "listening": None} and system.process is None
    assert ("systemctl", "daemon-reload") in system.ops


def unchanged_exporter(system: FakeSystem) -> dict:
    return {
        **NEW,
        "metrics.py": system.files[EXPORTER]["data"].decode(),
        "metrics.service": system.files[UNIT]["data"].decode(),
        "metrics.socket": system.files[SOCKET]["data"].decode(),
    }


def test_an_unchanged_enabled_exporter_costs_no_systemctl():
    """A peer change: the exporter keeps running (it reads the names again itself)."""
    system = guest(exporter_on=True)
    running = system.process
    assert run(system, unchanged_exporter(system))["ok"]
    assert not [op for op in system.ops if op[0] == "systemctl"], system.ops
    assert system.exporter["enabled"] and system.process == running


def test_an_unchanged_exporter_turned_on_is_started_then_enabled():
    system = guest()
    same = unchanged_exporter(system)
    assert run(system, same)["ok"]
    metrics = [op for op in system.ops if op[0] == "systemctl" and ga.METRICS_UNIT in op]
    assert metrics == [
        ("systemctl", "start", ga.METRICS_UNIT),
        ("systemctl", "enable", "--no-reload", "--quiet", ga.METRICS_UNIT),
    ]
    assert system.exporter == {"enabled": True, "listening": same["metrics.socket"].encode()}


def test_a_changed_exporter_is_stopped_and_its_socket_restarted():
    system = guest(exporter_on=True)
    assert run(system)["ok"]
    stop = ("systemctl", "disable", "--no-reload", "--quiet", "--now", ga.METRICS_SERVICE)
    assert system.ops.index(stop) < system.ops.index(("systemctl", "restart", ga.METRICS_UNIT))
    assert system.process is None and system.exporter["listening"] == NEW["metrics.socket"].encode()


def test_the_agents_units_new_to_an_appliance_are_loaded_and_its_socket_enabled():
    """An appliance deployed before the kept agent gets its units from the first sync."""
    system = guest(absent=[ga.FILES["agent.service"][0], ga.FILES["agent.socket"][0]])
    assert run(system)["ok"]
    reload = system.ops.index(("systemctl", "daemon-reload"))
    assert system.ops.index(("systemctl", "start", ga.TIMER, ga.SERVE_UNIT)) > reload
    assert [op for op in system.ops if op[:2] == ("systemctl", "daemon-reload")] == [
        ("systemctl", "daemon-reload")
    ], "one reload for the agent's units and the exporter's"
    assert system.files[ga.FILES["agent.socket"][0]]["data"] == NEW["agent.socket"].encode()


def test_the_real_enabled_check_looks_in_the_units_target(monkeypatch):
    seen = []
    monkeypatch.setattr(ga.os.path, "lexists", lambda path: seen.append(path) or True)
    assert ga.System().enabled(ga.METRICS_UNIT) and ga.System().enabled(ga.PEERS_UNIT)
    assert seen == [
        f"/etc/systemd/system/sockets.target.wants/{ga.METRICS_UNIT}",
        f"/etc/systemd/system/multi-user.target.wants/{ga.PEERS_UNIT}",
    ]
    assert seen[0] == ga.METRICS_WANTS


def test_an_unchanged_mtu_is_not_set_again():
    system = guest()
    assert run(system, {**NEW, "mtu": 1420})["ok"]
    assert not [op for op in system.ops if op[:2] == ("ip", "link")]
    assert system.files[ga.MTU_PATH]["data"] == b"1420\n"


def apply_ops(absent=(), exporter_on=False, request=NEW) -> int:
    system = guest(absent, exporter_on)
    assert run(system, request)["ok"]
    return len(system.ops)


OPTIONAL = [WG, NFT, SYSCTL, EXPORTER, UNIT, SOCKET, NAMES]


@settings(max_examples=150, deadline=None)
@given(
    absent=st.sets(st.sampled_from(OPTIONAL)),
    data=st.data(),
    error=st.sampled_from(
        [ga.Failed("nft: boom"), PermissionError(1, "denied"), KeyError("x"), ValueError("v")]
    ),
)
def test_a_failure_at_any_step_leaves_the_guest_as_it_was(absent, data, error):
    on = not {UNIT, EXPORTER, SOCKET} & absent and data.draw(st.booleans(), "was on")
    request = {**NEW, "metrics": data.draw(st.booleans(), label="metrics wanted")}
    step = data.draw(st.integers(0, apply_ops(absent, on, request) - 1), label="failing step")
    system = guest(absent, on, fail_at=step, error=error)
    before = system.state()
    out = run(system, request)
    assert out["ok"] is False and out["rolled_back"] is True, out
    assert out["not_restored"] == []
    assert system.state() == before
    assert type(error).__name__ in out["error"] or isinstance(error, ga.Failed)


def test_a_new_file_is_removed_and_its_sysctl_values_put_back():
    system = guest(absent=[SYSCTL], fail_on=("ip", "route", "replace"))
    out = run(system)
    assert out["rolled_back"] is True, out
    assert SYSCTL not in system.files
    assert system.files[FWD6]["data"] == b"0\n"
    assert system.files[ga.MTU_PATH]["data"] == b"1420\n"
    assert ("remove", SYSCTL) in system.ops


def test_without_old_files_the_live_ruleset_and_peers_come_back():
    system = guest(absent=[WG, NFT], fail_on=("ip", "link", "set", "wg0", "mtu", "1380"))
    out = run(system)
    assert out["rolled_back"] is True, out
    assert system.live == {"ruleset": "table inet old {}\n", "peers": "[Interface]\nold\n"}
    assert WG not in system.files and NFT not in system.files


def test_json_from_a_broken_command_changes_nothing():
    system = guest()
    listing = system._ip_j
    system._ip_j = lambda args, input: listing(args, input).replace('"addr_info"', "not json")
    before = system.state()
    out = run(system)
    assert out["untouched"] is True and "ip -batch" in out["error"], out
    assert system.state() == before


def test_output_of_a_broken_command_in_apply_is_rolled_back_too():
    system = guest()
    system._wg_show = lambda args, _: "peer=\tnot-a-network\n"
    before = system.state()
    out = run(system)
    assert out["rolled_back"] is True and out["error"].startswith("ValueError"), out
    assert system.state() == before


def test_what_cannot_be_restored_is_named_and_the_rest_is():
    system = guest(fail_on=("ip", "link", "set"))
    out = run(system)
    assert out["ok"] is False and out["rolled_back"] is False
    assert out["not_restored"] == ["wg0 MTU 1420: injected"]
    assert system.files[WG] == entry(OLD_WG, 0o600)
    assert system.live["ruleset"] == "table inet old {}\n"
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize(
    "request_line",
    [
        "{not json",
        "[1, 2]",
        json.dumps({**NEW, "sysctl": None}),
        json.dumps({k: v for k, v in NEW.items() if k != "wg0.conf"}),
        json.dumps({**NEW, "mtu": "1380"}),
        json.dumps({**NEW, "mtu": True}),
        json.dumps({**NEW, "mtu": 10}),
        json.dumps({**NEW, "metrics": "yes"}),
        json.dumps({k: v for k, v in NEW.items() if k != "metrics"}),
        json.dumps({**NEW, "peers.json": None}),
    ],
)
def test_a_bad_request_changes_nothing(request_line):
    system = guest()
    out = ga.outcome(request_line, system)
    assert out["untouched"] is True and out["error"].startswith("bad request"), out
    assert system.ops == []


def test_without_wg0_nothing_is_changed():
    system = guest(absent=[ga.MTU_PATH])
    out = run(system)
    assert out["untouched"] is True and "wg0 does not exist" in out["error"], out
    assert system.ops == []


def test_strip_drops_wg_quick_keys_only():
    conf = (
        "# comment = kept\n[Interface]\n address= 10.0.0.1/24\nMTU=1400\nPostUp = iptables -A\n"
        "ListenPort = 51820\nPrivateKey = abc=\n[Peer]\nPublicKey = xyz=\nTable = off\n"
        "AllowedIPs = 10.0.0.2/32\n"
    )
    assert ga.strip(conf) == (
        "# comment = kept\n[Interface]\nListenPort = 51820\nPrivateKey = abc=\n"
        "[Peer]\nPublicKey = xyz=\nAllowedIPs = 10.0.0.2/32\n"
    )


PLAIN = ["Address", "aDDress", "DNS", "mtu", "Table", "PostUp", "SaveConfig", "PublicKey"]
PLAIN += ["postupx", " ", "\t", "=", " = ", "\n", "10.0.0.1/24", "#", "[Peer]", "x"]
ODD = ["\r", "\x0b", "\x1c", "\xa0", "ſaveconfig", "\u2028"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PLAIN), max_size=30).map("".join))
def test_strip_in_one_pass_is_strip_line_by_line(conf):
    """Plain text (every rendered config) takes the one pass; it must strip what the loop
    strips."""
    assert conf.isascii() and ga._PLAIN_CONTROLS.isdisjoint(conf)
    assert ga.strip(conf) == ga.strip_lines(conf)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(PLAIN + ODD), max_size=30).map("".join))
def test_strip_of_odd_line_ends_and_blanks_is_line_by_line(conf):
    """Other line ends and blanks go through the loop, as wg-quick's bash reads them there
    (test_drift compares the loop with wg-quick itself)."""
    assert ga.strip(conf) == ga.strip_lines(conf)


def test_sysctl_keys_and_paths():
    text = "# a = b\n; c = d\n\nnet.ipv4.ip_forward = 1\n-net.ipv4.conf.eth0/1.rp_filter=2\n"
    assert ga.sysctl_keys(text) == ["net.ipv4.ip_forward", "net.ipv4.conf.eth0/1.rp_filter"]
    assert ga.sysctl_settings(text) == [
        ("net.ipv4.ip_forward", "1", False),
        ("net.ipv4.conf.eth0/1.rp_filter", "2", True),
    ]
    assert ga.sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert ga.sysctl_path("net.ipv4.conf.eth0/1.rp_filter") == (
        "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"
    )
    assert ga.sysctl_path("net/ipv4/conf/eth0.1/rp_filter") == (
        "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"
    )


def test_sysctl_is_loaded_in_process_and_a_quiet_key_may_fail():
    system = guest()
    ga.load_sysctl(
        system, "net.ipv4.ip_forward = 0\n-kernel.nope = 1\nnet.ipv6.conf.all.forwarding=1\n"
    )
    assert system.files[FWD4]["data"] == b"0\n" and system.files[FWD6]["data"] == b"1\n"
    assert ("sysctl", "/proc/sys/kernel/nope", "1") in system.ops
    with pytest.raises(ga.Failed, match="sysctl kernel.nope: FileNotFoundError: No such file"):
        ga.load_sysctl(system, "kernel.nope = 1\n")


def test_the_real_sysctl_write_is_what_the_kernel_reads(tmp_path):
    path = tmp_path / "ip_forward"
    ga.System().set_sysctl(str(path), "1")
    assert path.read_text() == "1\n"


def test_real_write_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    system, me = ga.System(), (os.getuid(), os.getgid())
    path = str(tmp_path / "f.conf")
    system.write(path, b"one\n", 0o600, me)
    assert system.read(path) == {"data": b"one\n", "mode": 0o600, "uid": me[0], "gid": me[1]}
    inode = os.stat(path).st_ino
    system.write(path, b"one\n", 0o600, me)
    assert os.stat(path).st_ino == inode, "identical content is left alone"
    system.write(path, b"one\n", 0o644, me)
    assert system.read(path)["mode"] == 0o644

    def immutable(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ga.os, "replace", immutable)
    with pytest.raises(PermissionError):
        system.write(path, b"two\n", 0o644, me)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["f.conf"] and system.read(path)["data"] == b"one\n"
    system.remove(path)
    system.remove(path)
    assert system.read(path) is None


def test_real_read_does_not_follow_links_and_run_names_the_failure(tmp_path):
    (tmp_path / "secret").write_text("s")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError):
        ga.System().read(str(tmp_path / "link"))
    with pytest.raises(ga.Failed, match="sh -c .*: bad"):
        ga.System().run("sh", "-c", "echo bad >&2; exit 3")
    assert ga.System().run("cat", input="é\n") == "é\n"


def test_real_run_both_runs_side_by_side_and_names_either_failure(tmp_path):
    """The first command waits for a file the second makes: one after the other, it would
    fail. The second reads more than a pipe holds. Either failing raises Failed naming it."""
    mark, out = tmp_path / "mark", tmp_path / "out"
    wait = f"for i in $(seq 200); do [ -e {mark} ] && exit 0; sleep 0.05; done; exit 4"
    big = "x" * 300_000
    ga.System().run_both(("sh", "-c", wait), ("sh", "-c", f"cat > {out}; touch {mark}"), big)
    assert out.read_text() == big
    with pytest.raises(ga.Failed, match="sh -c .*: first"):
        ga.System().run_both(("sh", "-c", "echo first >&2; exit 3"), ("true",))
    with pytest.raises(ga.Failed, match="sh -c .*: second"):
        ga.System().run_both(("true",), ("sh", "-c", "echo second >&2; exit 3"))


def test_the_program_sync_sends_runs_without_site_packages():
    """As sync sends it: the agent, whole, under `python3 -S -c`."""
    import subprocess
    import sys

    from builder.remote.appliance import AGENT

    program = AGENT.read_text()
    p = subprocess.run(
        [sys.executable, "-S", "-I", "-c", program, "sync"],
        input="\n",
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout)
    assert set(facts) == {"wg", "files", "addresses", "routes", "metrics"}
    assert p.stdout.count("\n") == 1
    # Only the default routes (this machine's own, of either family): what lan.gateway becomes.
    assert all(r["dst"] == "default" and "table" not in r for r in facts["routes"]), facts
    assert set(facts["files"]) == set(ga.FILES) and type(facts["metrics"]["enabled"]) is bool


def test_the_loader_keeps_one_copy_and_runs_it_from_bytecode(tmp_path):
    """The first call keeps the agent (dropping an older copy), later ones import it; every
    call answers as the agent run from its source does."""
    import subprocess
    import sys

    from builder.remote.appliance import AGENT, agent_program

    folder = tmp_path / "agent"
    folder.mkdir()
    (folder / "agent_0000000000000000.py").write_text("raise SystemExit('stale')\n")
    direct = subprocess.run(
        [sys.executable, "-S", "-c", AGENT.read_text(), "bogus"], capture_output=True, text=True
    )
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-S", "-c", agent_program(str(folder)), "bogus"],
            capture_output=True,
            text=True,
        )
        assert (r.returncode, r.stderr) == (direct.returncode, direct.stderr)
        kept = sorted(p.name for p in folder.glob("agent_*.py"))
        assert len(kept) == 1 and kept[0] != "agent_0000000000000000.py"
    assert list((folder / "__pycache__").glob(kept[0][:-3] + ".*.pyc"))
    (tmp_path / "file").write_text("")  # a folder that cannot be made: the source still runs
    r = subprocess.run(
        [sys.executable, "-S", "-c", agent_program(str(tmp_path / "file" / "agent")), "bogus"],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stderr) == (direct.returncode, direct.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw ICMP socket needs root")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ping_answers_over_loopback_in_both_families(host):
    """verify pings the LAN's IPv4 and IPv6 gateways with the same raw-socket code."""
    assert ga.ping(host)["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")
def test_ping_of_an_unreachable_ipv6_gateway_fails(tmp_path):
    """In a namespace of its own with only loopback, nothing answers and nothing leaves."""
    import subprocess

    ns = f"wgt-ping-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        code = "import json, sys; sys.path[:0] = sys.argv[1:2]; import agent; "
        code += "print(json.dumps(agent.ping('fd00::1', timeout=0.2, tries=2)))"
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c", code, os.path.dirname(ga.__file__)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert json.loads(r.stdout)["ok"] is False, r.stdout


@st.composite
def networks(draw):
    """A network as `wg` prints it (host bits clear), IPv4 or IPv6."""
    bits = draw(st.sampled_from([32, 128]))
    length = draw(st.integers(0, bits))
    value = draw(st.integers(0, 2**bits - 1)) >> (bits - length) << (bits - length)
    cls = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
    return str(cls((value, length)))


@st.composite
def interfaces(draw):
    """An interface address with its prefix, such as wg0 carries, near the networks."""
    net = ipaddress.ip_network(draw(networks()))
    host = draw(st.integers(0, net.num_addresses - 1))
    return f"{net.network_address + host}/{net.prefixlen}"


@settings(max_examples=300, deadline=None)
@given(st.lists(networks(), max_size=8), st.lists(interfaces(), max_size=3), st.data())
def test_wanted_routes_agree_with_ipaddress(nets, own, data):
    """The integer test of which AllowedIPs lie in wg0's subnets says what ipaddress says."""
    # Some networks inside the interfaces' subnets, which hypothesis alone rarely draws.
    for a in own:
        outer = ipaddress.ip_interface(a).network
        if outer.prefixlen < outer.max_prefixlen:
            sub = data.draw(st.integers(outer.prefixlen, outer.max_prefixlen))
            nets.append(str(next(outer.subnets(new_prefix=sub))))
    system = guest()
    system._wg_show = lambda args, _: "peer=\t" + (" ".join(nets) or "(none)") + "\n"
    outer = [ipaddress.ip_interface(a).network for a in own]
    expected = {
        n
        for n in nets
        if not any(
            ipaddress.ip_network(n).version == o.version and ipaddress.ip_network(n).subnet_of(o)
            for o in outer
        )
    }
    assert ga.wanted_routes(system, own) == expected


@pytest.mark.parametrize(
    "bad", ["not-a-network", "10.0.0.0/33", "fd00::/129", "10.0.0/8", "1.2.3.4/x"]
)
def test_a_network_wg_would_not_print_is_a_value_error(bad):
    with pytest.raises(ValueError):
        ga.prefix(bad)


def test_the_timer_is_judged_by_its_last_run(tmp_path, monkeypatch) -> None:
    """The timer's agent touches a file at each run; the probe takes a fresh one as working
    and otherwise asks systemctl (missing, stale, or from a clock that jumped)."""
    monkeypatch.setattr(ga, "TICKED", str(tmp_path / "peers.tick"))
    assert not ga.ticked(), "no run yet"
    ga.tick()
    now = os.stat(ga.TICKED).st_mtime
    assert ga.ticked(now) and ga.ticked(now + ga.TICK_FRESH_S)
    assert not ga.ticked(now + ga.TICK_FRESH_S + 1), "three runs missed"
    assert not ga.ticked(now - 60), "a file from the future"
    os.utime(ga.TICKED, (now - 100, now - 100))
    ga.tick()
    assert ga.ticked(), "a run refreshes it"
