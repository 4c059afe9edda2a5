"""Fuzzing the config loader: whatever the file holds, the answer is a config
or a ConfigError whose lines each name a place, never another exception.

Generated inputs: random nested documents (as data and as YAML text),
random mutations of a full valid config (every section), random YAML-ish
token soups, random edits of valid YAML text, and random bytes. Each test
is bounded (200 examples) so the unit tier stays fast.
"""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.yamlload import parse_yaml

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FULL: dict[str, Any] = {
    "node": {"name": "lb1"},
    "api": {"listen": "127.0.0.1:9180", "admin_token_file": "/etc/anycast-lb/token"},
    "drain": {"timeout": 30, "announce_grace": 2},
    "forwarding": {"engine": "relay", "splice": True, "buffer_size": 65536, "workers": 1},
    "services": [
        {
            "name": "web", "vip": "198.51.100.10", "port": 80, "protocol": "tcp",
            "balance": "maglev", "hash_key": "five_tuple", "min_healthy": 1,
            "proxy_protocol": False, "connect_timeout": 1.0, "idle_timeout": 300,
            "max_flows": 65536, "maglev_table_size": 65537,
            "backends": [{"address": "203.0.113.130", "port": 8080, "weight": 1},
                         {"address": "203.0.113.131", "port": 8080}],
            "health": {"kind": "http", "path": "/healthz", "host": "www.example.com",
                       "expect_status": [200, 204], "interval": 2, "fast_interval": 0.2,
                       "timeout": 1, "rise": 2, "fall": 3},
        },
        {
            "name": "dns", "vip": "198.51.100.10", "port": 53, "protocol": "udp",
            "backends": [{"address": "203.0.113.140", "port": 53}],
            "health": {"kind": "exec", "command": ["/bin/true", "--quiet"]},
        },
    ],
    "bgp": {
        "local_as": 65100, "router_id": "203.0.113.6", "local_address": "203.0.113.6",
        "hold_time": 3, "peers": [{"address": "203.0.113.5", "peer_as": 65000}],
        "announce": {"med": 100, "communities": ["65100:1"], "as_path_prepend": 0,
                     "withdraw_on_down": True, "down_med": 1000},
        "damping": {"enabled": True, "penalty": 1000, "suppress": 3000, "reuse": 750,
                    "half_life": 30, "max_suppress": 300},
        "exabgp": "exabgp", "refresh_interval": 30, "node_timeout": 0.6,
    },
    "cluster": {
        "flow_survival": False, "address": "203.0.113.10", "port": 7946, "interface": "eth0",
        "key_file": "/etc/anycast-lb/cluster.key",
        "peers": ["203.0.113.10", "203.0.113.11:7946", {"address": "203.0.113.12"}],
    },
}
FULL_YAML = yaml.safe_dump(FULL, sort_keys=False)
_LINE = re.compile(r"\S[^\n]*?: [^\n]+")


def test_the_full_config_is_valid() -> None:
    assert isinstance(parse_config(copy.deepcopy(FULL)), NodeConfig)
    assert isinstance(parse_config(parse_yaml(FULL_YAML.encode())), NodeConfig)


def assert_config_or_field_errors(data: Any) -> None:
    try:
        result = parse_config(data)
    except ConfigError as exc:
        assert_lines(exc)
    else:
        assert isinstance(result, NodeConfig)


def assert_lines(exc: ConfigError) -> None:
    assert exc.problems, exc
    for problem in exc.problems:
        assert _LINE.fullmatch(problem), problem


def load_bytes(data: bytes) -> None:
    try:
        document = parse_yaml(data)
    except ConfigError as exc:
        assert_lines(exc)
        return
    assert_config_or_field_errors(document)


_keys = st.one_of(
    st.sampled_from(["node", "name", "services", "vip", "port", "backends", "address", "health",
                     "kind", "bgp", "peers", "announce", "communities", "cluster", "api", "listen"]),
    st.text(max_size=8),
)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["198.51.100.10", "203.0.113.1", "2001:db8::1", "127.0.0.1:9180", "tcp", "udp",
                     "http", "exec", "65100:1", "65100:1\n", "٦٥١٠٠:1", "/healthz", "lb1"]),
)
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@FUZZ
@given(_documents)
def test_random_documents(data: Any) -> None:
    assert_config_or_field_errors(data)


@FUZZ
@given(_documents)
def test_random_documents_as_yaml(data: Any) -> None:
    load_bytes(yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass"))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


_PATHS = _paths(FULL)[1:]


def _mutate(doc: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[str(value)[:8]] = value
    elif op == "add":
        parent.append(value)
    return doc


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_PATHS), st.sampled_from(["replace", "delete", "add"]),
                          _documents), min_size=1, max_size=3))
def test_mutations_of_a_full_config(mutations: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    doc = copy.deepcopy(FULL)
    for path, op, value in mutations:
        try:
            doc = _mutate(doc, path, op, value)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier mutation removed or replaced this place
    assert_config_or_field_errors(doc)
    load_bytes(yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass"))


_TOKENS = ["[", "]", "{", "}", ",", ":", ": ", "- ", "\n", "  ", "? ", "&a ", "*a", "&b ", "*b", "<<: ",
           "!!int ", "!!str ", "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "!!python/name:os.system ",
           "---\n", "...\n", "'", '"', "#", "|\n", ">\n", "%YAML 1.1\n", "\t", "\x00", "\ufeff",
           "services", "port", "name", "1", "65100:1", "2001-13-45", "1e400", "0x1F", ".inf", "~",
           "yes", "é", "٦", "\u2028", "\x85"]


@FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=60))
def test_yaml_token_soup(tokens: list[str]) -> None:
    load_bytes("".join(tokens).encode("utf-8"))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(FULL_YAML)), st.integers(0, 8),
                          st.sampled_from(_TOKENS) | st.text(max_size=3)), min_size=1, max_size=4))
def test_edits_of_valid_yaml(edits: list[tuple[int, int, str]]) -> None:
    text = FULL_YAML
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut:]
    load_bytes(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    load_bytes(data)


@FUZZ
@given(st.binary(max_size=40), st.integers(0, len(FULL_YAML)))
def test_random_bytes_inside_valid_yaml(junk: bytes, at: int) -> None:
    data = FULL_YAML.encode()
    load_bytes(data[:at] + junk + data[at:])
