"""The kernel data path for real, in a scratch namespace (root and nft needed):
install, a map update, a transaction that must abort whole, and a teardown
that leaves the namespace as it found it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

NS = "albt-cluster-kt"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, nft and ip (network namespaces)",
)

# Runs inside the namespace; prints one JSON object of observations.
SCRIPT = textwrap.dedent('''
    import asyncio, json, subprocess
    from anycast_lb.cluster.kernel import KernelDataPath
    from anycast_lb.cluster.nft import NftSettings
    from anycast_lb.cluster.ownership import MapPlan
    from anycast_lb.cluster.routing import RoutingSettings
    from anycast_lb.errors import ClusterError

    K1 = ("203.0.113.99", 40001, "198.51.100.10", 80)
    K2 = ("203.0.113.98", 40002, "198.51.100.10", 80)
    peers = ("203.0.113.2", "203.0.113.3")

    def look():
        rules = json.loads(subprocess.run(["ip", "-j", "rule", "show"], capture_output=True,
                                          text=True, check=True).stdout)
        table = subprocess.run(["nft", "-j", "list", "table", "ip", "albt_kt"],
                               capture_output=True, text=True)
        elements = []
        if table.returncode == 0:
            for item in json.loads(table.stdout)["nftables"]:
                if "map" in item and item["map"]["name"] == "owner":
                    elements = [str(e) for e in item["map"].get("elem", [])]
        routes = subprocess.run(["ip", "route", "show", "table", "4201"], capture_output=True,
                                text=True).stdout.strip()
        sysctl = {k: open(f"/proc/sys/net/ipv4/{k}").read().strip()
                  for k in ("ip_forward", "conf/all/rp_filter", "conf/lan0/rp_filter")}
        return {"rules": [[r["priority"], r.get("fwmark"), r["table"]] for r in rules],
                "table": table.returncode == 0, "elements": len(elements),
                "route": routes, "sysctl": sysctl}

    async def main():
        dp = KernelDataPath(
            NftSettings("albt_kt", "lan0", (("198.51.100.10", 80),), peers, 0x1B0000, 30),
            RoutingSettings("lan0", peers, 0x1B0000, 4200, 100))
        out = {"before": look(), "unavailable": dp.unavailable()}
        await dp.install((0, 1), {K1: 1})
        out["installed"] = look()
        await dp.update((1,), MapPlan(add=((K2, 0),)))
        out["updated"] = look()
        try:
            await dp.update(None, MapPlan(delete=(("203.0.113.1", 1, "198.51.100.10", 80),),
                                          add=((("203.0.113.1", 2, "198.51.100.10", 80), 0),)))
            out["abort"] = "no error"
        except ClusterError as exc:
            out["abort"] = str(exc)
        out["after_abort"] = look()
        out["counters"] = await dp.counters()
        await dp.remove()
        out["removed"] = look()
        print(json.dumps(out))

    asyncio.run(main())
''')


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def namespace() -> object:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    try:
        for argv in (["ip", "link", "set", "lo", "up"],
                     ["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
                     ["ip", "addr", "add", "203.0.113.1/24", "dev", "lan0"],
                     ["ip", "link", "set", "lan0", "up"],
                     ["ip", "link", "set", "lan1", "up"],
                     ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"]):
            sh("ip", "netns", "exec", NS, *argv)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def test_install_update_abort_and_a_clean_teardown(namespace: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    fresh = [[0, None, "local"], [32766, None, "main"], [32767, None, "default"]]
    assert out["before"]["rules"] == fresh and out["unavailable"] is None
    installed = out["installed"]
    assert installed["rules"] == [
        [100, "0x1b0000", "4200"], [101, "0x1b0001", "4201"], [164, None, "local"], *fresh[1:]]
    assert installed["table"] and installed["elements"] == 1
    assert installed["route"] == "default via 203.0.113.3 dev lan0 onlink"
    assert installed["sysctl"] == {"ip_forward": "1", "conf/all/rp_filter": "1",
                                   "conf/lan0/rp_filter": "2"}
    assert out["updated"]["elements"] == 2
    # A delete of a missing element aborts the whole transaction: the add
    # beside it did not happen either.
    assert "No such file or directory" in out["abort"]
    assert out["after_abort"]["elements"] == 2
    assert out["counters"] == dict.fromkeys(
        ("steered", "second_chance", "dead_owner", "received", "refused"), 0)
    assert out["removed"] == out["before"]
