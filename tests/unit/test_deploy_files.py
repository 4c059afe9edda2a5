"""The Dockerfile and the systemd unit, checked by parsing them (no Docker
engine or systemd on the machines that run the tests): what each must
hold for a node to drain on stop, run unprivileged and report health."""

from __future__ import annotations

import configparser
import json
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from anycast_lb.config import DrainConfig

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined,
    comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line ends the file"
    return out


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if word == "FROM":
            result.append([])
        assert result, f"{word} before the first FROM"
        result[-1].append((word, rest))
    return result


def _args(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for w, rest in stage if w == word]


def test_dockerfile_is_multi_stage_and_copies_the_venv_from_the_build(stages) -> None:  # type: ignore[no-untyped-def]
    assert len(stages) >= 2
    assert _args(stages[0], "FROM")[0].endswith(" AS build")
    assert any(c.startswith("--from=build /opt/anycast-lb") for c in _args(stages[-1], "COPY"))


def test_dockerfile_build_installs_the_package_with_exabgp(stages) -> None:  # type: ignore[no-untyped-def]
    runs = " ".join(_args(stages[0], "RUN"))
    assert "pip install" in runs and "exabgp --version" in runs
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("exabgp") for d in deps)


def test_dockerfile_copies_only_what_exists(stages) -> None:  # type: ignore[no-untyped-def]
    for stage in stages:
        for args in _args(stage, "COPY"):
            if args.startswith("--from"):
                continue
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source


def test_dockerfile_final_stage_runs_the_node_unprivileged(stages) -> None:  # type: ignore[no-untyped-def]
    final = stages[-1]
    users = _args(final, "USER")
    assert users and users[-1] not in ("root", "0")
    assert json.loads(_args(final, "ENTRYPOINT")[0]) == ["anycast-lb"]
    cmd = json.loads(_args(final, "CMD")[0])
    assert cmd[:3] == ["run", "--config", "/etc/anycast-lb/node.yaml"]
    assert _args(final, "STOPSIGNAL") == ["SIGTERM"]


def _healthcheck_argv(stages) -> list[str]:  # type: ignore[no-untyped-def]
    (check,) = _args(stages[-1], "HEALTHCHECK")
    options, _, form = check.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(form)
    assert isinstance(argv, list) and "/healthz" in " ".join(argv)
    return [str(a) for a in argv]


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "alive"}')

    def log_message(self, *args: object) -> None:
        pass


def test_dockerfile_healthcheck_passes_on_200_and_fails_without_a_node(stages) -> None:  # type: ignore[no-untyped-def]
    argv = _healthcheck_argv(stages)
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ok = subprocess.run(argv, env={"ANYCAST_LB_API": f"127.0.0.1:{port}"},
                            capture_output=True, timeout=10, check=False)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run(argv, env={"ANYCAST_LB_API": f"127.0.0.1:{port}"},
                          capture_output=True, timeout=10, check=False)
    assert down.returncode != 0


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((ROOT / "deploy/systemd/anycast-lb.service").read_text())
    return parser


def test_unit_stops_by_draining(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    defaults = DrainConfig()
    assert float(service["TimeoutStopSec"]) > defaults.timeout + defaults.announce_grace


def test_unit_restarts_on_failure_but_not_on_a_bad_config(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    start = shlex.split(service["ExecStart"])
    pre = shlex.split(service["ExecStartPre"])
    assert start[1:3] == ["run", "--config"] and pre[1] == "check-config"
    assert pre[2] == start[3]


def test_unit_reload_sends_sighup(unit: configparser.ConfigParser) -> None:
    assert shlex.split(unit["Service"]["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_unit_grants_only_the_capabilities_the_node_needs(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    wanted = {"CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(service["AmbientCapabilities"].split()) == wanted
    assert set(service["CapabilityBoundingSet"].split()) == wanted
    assert service["User"] != "root"
    assert int(service["LimitNOFILE"]) >= 65536


def _verify(unit_text: str, tmp_path: Path) -> str:
    path = tmp_path / "anycast-lb.service"
    path.write_text(unit_text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=30, check=False)
    return result.stdout + result.stderr


def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` works without a running systemd; it only
    warns (exit 0) on a bad line, so any output about the file fails."""
    venv_bin = Path(sys.executable).parent
    text = (ROOT / "deploy/systemd/anycast-lb.service").read_text().replace(
        "/opt/anycast-lb/bin/", f"{venv_bin}/")
    assert _verify(text, tmp_path) == ""
    assert "kill mode" in _verify(text.replace("KillMode=mixed", "KillMode=drain"), tmp_path)
