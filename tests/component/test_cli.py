"""The command line as a user runs it: exit codes, messages, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.component.backends import TcpNameEcho, tcp_request
from tests.component.nodes import BoundAddresses, wait_bound
from tests.procs import kill
from tests.waiting import wait_until

ANYCAST_LB = [sys.executable, "-m", "anycast_lb"]


def write(tmp_path: Path, data: object, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(port: int) -> dict[str, object]:
    """A one-service node; ``run --ephemeral-ports`` binds its API and its
    listener on port 0 of 127.0.0.1 (the configured port 1 is never bound)."""
    return {
        "node": {"name": "cli-node"},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 2},
        "services": [
            {
                "name": "web",
                "vip": "127.0.0.1",
                "port": 1,
                "backends": [{"address": "127.0.0.1", "port": port}],
                "health": {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2, "rise": 1},
            }
        ],
    }


def test_check_config_ok(tmp_path: Path) -> None:
    result = subprocess.run([*ANYCAST_LB, "check-config", str(write(tmp_path, minimal(8080)))],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "ok (node cli-node, 1 service(s), bgp off)" in result.stdout


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path, command: str) -> None:
    data = minimal(8080)
    service = data["services"][0]  # type: ignore[index]
    service["port"] = 0
    service["backends"].append({"address": "127.0.0.1", "port": 99999})
    service["surprise"] = True
    path = write(tmp_path, data)
    argv = [*ANYCAST_LB, command, str(path)] if command == "check-config" else [
        *ANYCAST_LB, "run", "--config", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert "services[0].port:" in result.stderr
    assert "services[0].backends[1].port:" in result.stderr
    assert "services[0].surprise: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def _hard_limit_at(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_caps_that_cannot_fit_the_open_file_limit_exit_2(tmp_path: Path, command: str) -> None:
    data = minimal(8080)
    data["forwarding"] = {"max_tcp_connections": 1000}  # 2,000 descriptors
    path = write(tmp_path, data)
    argv = [*ANYCAST_LB, command, str(path)] if command == "check-config" else [
        *ANYCAST_LB, "run", "--config", str(path)]
    # A hard limit of 1024, as under systemd's LimitNOFILE=1024.
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30,
                            preexec_fn=lambda: _hard_limit_at(1024))
    assert result.returncode == 2, result.stderr
    assert "forwarding.max_tcp_connections: 1000 needs 2000 descriptors" in result.stderr
    assert "the open-file limit 1024" in result.stderr
    assert "Traceback" not in result.stderr
    fits = subprocess.run([*ANYCAST_LB, "check-config", "--nofile", "4096", str(path)],
                          capture_output=True, text=True, check=False, timeout=30)
    assert fits.returncode == 0, fits.stderr
    assert "descriptors: limit 4096" in fits.stdout and "tcp connections 1000" in fits.stdout


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([*ANYCAST_LB, "check-config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_schema_matches_docs() -> None:
    result = subprocess.run([*ANYCAST_LB, "schema"], capture_output=True, text=True, check=True)
    published = Path(__file__).parents[2] / "docs" / "config.schema.json"
    assert json.loads(result.stdout) == json.loads(published.read_text())


async def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> BoundAddresses:
    """Wait until the ``--ephemeral-ports`` node in ``proc`` (stderr to
    ``log``) logged its bound addresses and answers 200 on /readyz
    (deadline 15 s each); its bound addresses."""
    bound = await wait_bound(lambda: log.read_text(errors="replace"), ["web"],
                             alive=lambda: proc.poll() is None, timeout=15)

    async def ready() -> bool:
        assert proc.poll() is None, "node exited"
        try:
            async with aiohttp.ClientSession() as session, session.get(
                f"{bound.api_url}/readyz"
            ) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(ready, timeout=15, interval=0.05, what="node ready")
    return bound


def start_node(path: Path, log: Path) -> subprocess.Popen[bytes]:
    """``anycast-lb run --ephemeral-ports`` on ``path``, stderr to ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([*ANYCAST_LB, "run", "--config", str(path), "--ephemeral-ports"],
                                stdout=subprocess.PIPE, stderr=err)


async def test_run_serves_then_exits_0_on_sigterm(tmp_path: Path) -> None:
    backend = TcpNameEcho("be")
    await backend.start()
    path = write(tmp_path, minimal(backend.port))
    log = tmp_path / "node.log"
    proc = start_node(path, log)
    try:
        bound = await wait_ready(proc, log)
        assert bound.services["web"][0] == "127.0.0.1"
        assert (await tcp_request(bound.services["web"][1]))[0] == "be"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        err = log.read_text()
        assert proc.returncode == 0, err
        assert out == b""  # stdout stays clean: logs go to stderr
        assert "event=node.started" in err and "event=node.stopped" in err
    finally:
        kill(proc)
        await backend.stop()


def test_run_reports_a_missing_exabgp_in_one_line(tmp_path: Path) -> None:
    data = minimal(8080)
    data["bgp"] = {
        "local_as": 65100, "router_id": "127.0.0.1", "local_address": "127.0.0.1",
        # Loopback peer: nothing leaves the machine even if a session were tried.
        "peers": [{"address": "127.0.0.2", "peer_as": 65000}],
        "exabgp": str(tmp_path / "no-such-exabgp"),
    }
    result = subprocess.run([*ANYCAST_LB, "run", "--config", str(write(tmp_path, data)),
                             "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "anycast-lb: " in result.stderr and "no-such-exabgp" in result.stderr


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    backend = TcpNameEcho("be")
    await backend.start()
    data = minimal(backend.port)
    data["drain"] = {"timeout": 60}
    log = tmp_path / "node.log"
    proc = start_node(write(tmp_path, data), log)
    try:
        bound = await wait_ready(proc, log)
        # An open connection keeps the graceful stop waiting (drain timeout 60 s).
        reader, writer = await asyncio.open_connection(*bound.services["web"])
        assert await reader.readline() == b"be\n"
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "event=node.stopping" in log.read_text(errors="replace"),
                         timeout=10, what="graceful stop begun")
        assert proc.poll() is None  # still draining
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert proc.returncode == 1
        writer.close()
    finally:
        kill(proc)
        await backend.stop()


def test_check_config_refuses_a_cluster_key_file_the_node_would_refuse(tmp_path: Path) -> None:
    data = minimal(8080)
    key = tmp_path / "cluster.key"
    key.write_text("c2hvcnQ=\n")  # "short": 5 bytes
    key.chmod(0o600)
    data["cluster"] = {"flow_survival": False, "address": "127.0.0.1", "interface": "lo",
                       "peers": ["127.0.0.2"], "key_file": str(key)}
    path = write(tmp_path, data)
    result = subprocess.run([*ANYCAST_LB, "check-config", str(path)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2 and "5 bytes, at least 16" in result.stderr, result.stderr
    key.write_text("YW55Y2FzdC1sYiB0ZXN0IGtleSAwMDAwMDAwMDAwMDA=\n")
    key.chmod(0o644)
    result = subprocess.run([*ANYCAST_LB, "check-config", str(path)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2 and "chmod 600" in result.stderr, result.stderr
    key.chmod(0o600)
    result = subprocess.run([*ANYCAST_LB, "check-config", str(path)],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("problem", ["missing", "open to others"])
def test_a_token_file_problem_names_the_config_and_the_token_file(
        tmp_path: Path, command: str, problem: str) -> None:
    data = minimal(8080)
    token = tmp_path / "secrets" / "token"
    if problem != "missing":
        token.parent.mkdir()
        token.write_text("s3cret\n")
        token.chmod(0o644)
    data["api"] = {"listen": "127.0.0.1:0", "admin_token_file": str(token)}
    path = write(tmp_path, data)
    argv = [str(path)] if command == "check-config" else ["--ephemeral-ports", "-c", str(path)]
    result = subprocess.run([*ANYCAST_LB, command, *argv],
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2, result.stderr
    first, *rest = result.stderr.splitlines()
    assert first == f"anycast-lb: invalid config {path}: 1 problem(s)", result.stderr
    reason = "No such file or directory" if problem == "missing" else "chmod 600"
    assert rest[0].startswith("  api.admin_token_file: ") and str(token) in rest[0] \
        and reason in rest[0], result.stderr


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a line its error must hold)."""
    good = yaml.safe_dump(minimal(8080))
    http_host_crlf = minimal(8080)
    http_host_crlf["services"][0]["health"] = {"kind": "http", "host": "b\r\nX: 1"}  # type: ignore[index]
    files: dict[str, tuple[bytes, str]] = {
        "community-newline": (yaml.safe_dump({**minimal(8080), "bgp": {
            "local_as": 65100, "router_id": "127.0.0.1", "local_address": "127.0.0.1",
            "peers": [{"address": "127.0.0.2", "peer_as": 65000}],
            "announce": {"communities": ["65100:1\n"]}}}).encode(),
            "bgp.announce.communities[0]: '65100:1\\n' is not a community"),
        "host-crlf": (yaml.safe_dump(http_host_crlf).encode(),
                      "services[0].health.host: 'b\\r\\nX: 1' is not a Host header value"),
        "port-true": (good.replace("port: 8080", "port: true").encode(),
                      "services[0].backends[0].port: Input should be a valid integer, got a boolean (True)"),
        "duplicate-key": ((good + "node: {name: other}\n").encode(), "duplicate key 'node' (first at line "),
        "deep": (("extra: " + "[" * 500 + "]" * 500 + "\n" + good).encode(), "nested deeper than 64 levels"),
        "not-utf8": (good.encode().replace(b"cli-node", b"cli-n\xf6de"), "(file): not UTF-8: byte 0xf6"),
        "too-big": (good.encode() + b"#" * (1024 * 1024) + b"\n", "(file): larger than 1048576 bytes"),
    }
    out = {}
    for name, (content, expected) in files.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        out[name] = (path, expected)
    return out


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_hostile_files_exit_2_with_one_clear_message(tmp_path: Path, command: str) -> None:
    for name, (path, expected) in _bad_files(tmp_path).items():
        argv = [*ANYCAST_LB, command, str(path)] if command == "check-config" else [
            *ANYCAST_LB, "run", "--config", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert result.stderr.startswith("anycast-lb: invalid config "), (name, result.stderr)
        assert result.stdout == "", name


async def test_api_option_reaches_a_node_run_with_ephemeral_ports(tmp_path: Path) -> None:
    backend = TcpNameEcho("be")
    await backend.start()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    data = minimal(backend.port)
    data["api"] = {"listen": "127.0.0.1:0", "admin_token_file": str(token)}
    path = write(tmp_path, data)
    log = tmp_path / "node.log"
    proc = start_node(path, log)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ANYCAST_LB, *args, "--config", str(path)],
                              capture_output=True, text=True, check=False, timeout=30)

    try:
        bound = await wait_ready(proc, log)
        api = f"{bound.api[0]}:{bound.api[1]}"
        # The config file's api.listen (port 0) is not where the node listens ...
        done = await asyncio.to_thread(cli, "status")
        assert done.returncode == 1, done
        assert "cannot reach the node's API at http://127.0.0.1:0/status" in done.stderr, done
        # ... --api is; the token still comes from the file.
        done = await asyncio.to_thread(cli, "status", "--api", api)
        assert done.returncode == 0, done
        assert done.stdout.startswith("node cli-node  drain: serving"), done
        done = await asyncio.to_thread(cli, "drain", "--api", api)
        assert (done.returncode, json.loads(done.stdout)) == (0, {"draining": True}), done
        done = await asyncio.to_thread(cli, "status", "--json", "--api", api)
        assert done.returncode == 0 and json.loads(done.stdout)["node"]["draining"], done
        done = await asyncio.to_thread(cli, "undrain", "--api", api)
        assert (done.returncode, json.loads(done.stdout)) == (0, {"draining": False}), done
        for bad, reason in (("127.0.0.1:0", "port 0 is not an address to call"),
                            ("localhost:9180", "'localhost' is not an IP address"),
                            ("::1:9180", "write an IPv6 address in brackets"),
                            ("127.0.0.1:65536", "'65536' is not a port")):
            done = await asyncio.to_thread(cli, "undrain", "--api", bad)
            assert done.returncode == 2, (bad, done)
            assert "Invalid value for '--api'" in done.stderr and reason in done.stderr, (bad, done)
        assert proc.poll() is None
    finally:
        kill(proc)
        await backend.stop()
