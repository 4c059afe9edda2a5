"""The compose and containerlab files generated from the namespace lab's
topology: committed copies match the generator, the addresses follow the
plan, and the containerlab file passes the structural check."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from anycast_lb.config import parse_config
from anycast_lb.lab import export
from anycast_lb.lab import topology as T

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_committed_files_match_the_generator(fmt: str) -> None:
    base = ROOT / export.DEFAULT_DIRS[fmt]
    stale = [name for name, text in export.export(fmt).items()
             if not (base / name).is_file() or (base / name).read_text() != text]
    assert not stale, f"run: anycast-lb lab export --format {fmt}  (stale: {stale})"


def test_compose_router_hashes_ecmp_on_the_l4_headers() -> None:
    doc = yaml.safe_load(export.export("compose")[export.COMPOSE_FILE])
    sysctls = doc["services"]["router"]["sysctls"]
    assert sysctls["net.ipv4.fib_multipath_hash_policy"] == "3"
    assert sysctls["net.ipv4.fib_multipath_hash_fields"] == "0x37"


def test_compose_addresses_sit_in_their_networks_and_avoid_docker_gateways() -> None:
    doc = yaml.safe_load(export.export("compose")[export.COMPOSE_FILE])
    nets = {name: net["ipam"]["config"][0] for name, net in doc["networks"].items()}
    used: dict[str, set[str]] = {name: set() for name in nets}
    for service in doc["services"].values():
        for name, spec in service["networks"].items():
            address = spec["ipv4_address"]
            assert ipaddress.ip_address(address) in ipaddress.ip_network(nets[name]["subnet"])
            assert address != nets[name]["gateway"]
            assert address not in used[name], f"{address} twice on {name}"
            used[name].add(address)


def test_compose_node_configs_are_valid_and_peer_with_the_router() -> None:
    doc = yaml.safe_load(export.export("compose")[export.COMPOSE_FILE])
    router = doc["services"]["router"]["networks"]
    frr = doc["configs"]["frr_conf"]["content"]
    for i in (1, 2, 3):
        text = doc["configs"][f"lb{i}_yaml"]["content"].replace("$$", "$")
        cfg = parse_config(yaml.safe_load(text), f"lb{i}")
        assert cfg.bgp is not None
        assert str(cfg.bgp.peers[0].address) == router[f"link{i}"]["ipv4_address"]
        node_address = doc["services"][f"lb{i}"]["networks"][f"link{i}"]["ipv4_address"]
        assert str(cfg.bgp.local_address) == node_address
        assert f"neighbor {node_address} peer-group NODES" in frr


def test_containerlab_keeps_the_namespace_lab_addresses() -> None:
    files = export.export("containerlab")
    doc = yaml.safe_load(files[export.CONTAINERLAB_FILE])
    topo = T.plan()
    for n in topo.nodes:
        execs = doc["topology"]["nodes"][n.name]["exec"]
        assert f"ip addr add {n.address}/30 dev up0" in execs
        assert f"ip route replace default via {n.router_address}" in execs
        cfg = yaml.safe_load(files[f"{n.name}/node.yaml"])
        assert cfg["bgp"]["exabgp"] == export.IMAGE_EXABGP


def test_the_committed_containerlab_file_passes_the_structural_check() -> None:
    base = ROOT / export.DEFAULT_DIRS["containerlab"]
    assert export.check_containerlab((base / export.CONTAINERLAB_FILE).read_text(), base) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["topology"]["links"].append({"endpoints": ["lb1:up0", "router:x"]}),
     "used twice"),
    (lambda d: d["topology"]["links"].append({"endpoints": ["lb9:up0", "router:y"]}),
     "no node 'lb9'"),
    (lambda d: d["topology"]["links"].append(
        {"endpoints": ["lb1:an-interface-name-too-long", "router:z"]}), "bad interface name"),
    (lambda d: d["topology"]["nodes"]["router"]["sysctls"].update(
        {"net.ipv4.fib_multipath_hash_policy": "1"}), "ECMP must hash"),
    (lambda d: d["topology"]["nodes"]["lb1"].update({"bogus": 1}), "unknown keys"),
    (lambda d: d["topology"]["nodes"]["lb1"].update({"kind": "vm"}), ".kind"),
    (lambda d: d["topology"]["nodes"]["lb1"]["binds"].append("missing.yaml:/x"),
     "missing.yaml is not a file"),
])
def test_the_structural_check_catches(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    base = ROOT / export.DEFAULT_DIRS["containerlab"]
    doc = yaml.safe_load((base / export.CONTAINERLAB_FILE).read_text())
    mutate(doc)
    problems = export.check_containerlab(yaml.safe_dump(doc), base)
    assert any(expected in p for p in problems), problems


def test_docker_plan_refuses_more_nodes_than_it_holds() -> None:
    with pytest.raises(ValueError, match="7 nodes"):
        export.docker_topology(T.plan(nodes=8))
