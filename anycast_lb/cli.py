"""The ``anycast-lb`` command line. The only place exceptions become exit codes:
0 success, 1 runtime error, 2 invalid config or usage.

::

    anycast-lb check-config node.yaml
    anycast-lb run --config node.yaml
    anycast-lb drain [--wait [--timeout S]]|undrain|reload --config node.yaml [--api HOST:PORT]
    anycast-lb backend drain|undrain SERVICE ADDRESS:PORT --config node.yaml [--api HOST:PORT]
    anycast-lb backend weight SERVICE ADDRESS:PORT N --config node.yaml [--api HOST:PORT]
    anycast-lb status [--json] --config node.yaml [--api HOST:PORT]
    anycast-lb exabgp-config --config node.yaml
    anycast-lb schema
    anycast-lb backend-setup --vip VIP [--apply]
    anycast-lb lab up|status|run|down|demo
    anycast-lb cluster push|show|history|diff|rollback|members
    anycast-lb vip owners
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from anycast_lb import __version__, log
from anycast_lb.config import (
    Engine,
    NodeConfig,
    format_host_port,
    json_schema,
    load_config,
    parse_host_port,
)
from anycast_lb.consensus.cli import cluster
from anycast_lb.election.cli import vip
from anycast_lb.errors import AnycastLBError, ClusterError, ConfigError
from anycast_lb.lab.cli import lab
from anycast_lb.limits import Budget, hard_nofile, plan, raise_nofile

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _load(path: Path) -> NodeConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"anycast-lb: invalid config {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anycast-lb")
def main() -> None:
    """Active-active BGP anycast L4 load balancer."""


def _check_files(cfg: NodeConfig, path: Path) -> None:
    """Read the files the config names as the node will (the API token, the
    cluster key); a problem exits 2 naming both the config file and the
    file at fault."""
    if cfg.api.admin_token_file is not None:
        from anycast_lb.api import read_token_file  # deferred: keeps the other commands light

        try:
            read_token_file(cfg.api.admin_token_file)
        except ConfigError as exc:
            # The problem line names the token file; the source, the config.
            click.echo(f"anycast-lb: invalid config {ConfigError(str(path), exc.problems)}",
                       err=True)
            sys.exit(EXIT_CONFIG)
    if cfg.cluster is not None:  # the runtime refuses a bad key file: so does the check
        from anycast_lb.cluster.keys import KeyFile

        try:
            KeyFile(cfg.cluster.key_file).load()
        except ClusterError as exc:
            click.echo(f"anycast-lb: invalid config {path}: {exc}", err=True)
            sys.exit(EXIT_CONFIG)


def _plan(cfg: NodeConfig, path: Path, limit: int) -> Budget:
    try:
        return plan(limit, cfg, source=str(path))
    except ConfigError as exc:
        click.echo(f"anycast-lb: invalid config {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command("check-config")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--nofile", type=click.IntRange(min=1), default=None,
              help="Open-file limit the node will run with (LimitNOFILE); default: the "
                   "hard limit of this shell, which `run` raises its soft limit to.")
def check_config(config: Path, nofile: int | None) -> None:
    """Validate CONFIG; print a summary, or one line per problem (exit 2).

    Also plans the descriptor budget (docs/limits.md): caps set in the file
    that cannot fit the open-file limit are refused.
    """
    cfg = _load(config)
    _check_files(cfg, config)
    budget = _plan(cfg, config, nofile if nofile is not None else hard_nofile())
    click.echo(f"{config}: ok (node {cfg.node.name}, {len(cfg.services)} service(s), "
               f"bgp {'on' if cfg.bgp else 'off'})")
    for s in cfg.services:
        click.echo(f"  {s.name}: {format_host_port(s.vip, s.port)}/{s.protocol.value} -> "
                   f"{len(s.backends)} backend(s), {s.balance.value}, health {s.health.kind.value}")
    udp = ", ".join(f"{name} {cap} (per source {budget.udp_flows_per_source[name]})"
                    for name, cap in budget.udp_flows.items())
    click.echo(f"  descriptors: limit {budget.limit}, reserve {budget.reserve.total}, "
               f"tcp connections {budget.tcp_connections} per process"
               + (f" (per source {budget.tcp_connections_per_source})"
                  if budget.tcp_connections else "")
               + (f", udp flows {udp}" if udp else ""))


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@main.command()
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path),
              help="Node config file (YAML).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="kv", type=click.Choice(log.FORMATS),
              help="kv: key=value lines; json: one JSON object per line (docs/logging.md).")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Directory for ExaBGP's config and the announcer socket (default: a new temp dir).")
@click.option("--no-uvloop", is_flag=True, help="Use the standard asyncio loop.")
@click.option("--ephemeral-ports", is_flag=True,
              help="For tests and labs: bind the API and every service listener (also "
                   "one added by a reload) on port 0 of its configured address; the bound "
                   "addresses are logged (api.listening, forwarder.listening).")
def run(config: Path, log_level: str, log_format: log.LogFormat, run_dir: Path | None,
        no_uvloop: bool, ephemeral_ports: bool) -> None:
    """Run a node: forwarders, health checks, HTTP API and (with a bgp section) ExaBGP.

    SIGTERM or SIGINT (to the node alone or to its whole process group)
    drains and stops gracefully (exit 0); a second one exits at once (exit
    1). SIGHUP re-reads CONFIG and applies it live (docs/config.md, "Live
    reload"); a file that fails validation or needs a restart is refused and
    logged (config.refused), and the node keeps running on the last good one.

    ``--ephemeral-ports`` (tests and labs, never production: routers send
    traffic to the VIP's configured port) lets the kernel pick each port,
    so no caller has to pick a free one beforehand (and race others for
    it); read the bound addresses from the ``api.listening`` and
    ``forwarder.listening`` log lines. ``anycast-lb drain``, ``undrain``,
    ``status``, ``reload`` and ``backend ...`` reach such a node with
    ``--api HOST:PORT`` (the ``api.listening`` address) in place of the
    config file's ``api.listen``.
    """
    cfg = _load(config)
    _check_files(cfg, config)
    if cfg.forwarding.engine is Engine.KERNEL:
        _check_kernel_engine(cfg)
    os.environ[log.FORMAT_ENV] = log_format  # relay workers and the announcer log alike
    log.setup(log_level, log_format)
    soft, hard = raise_nofile()
    budget = _plan(cfg, config, soft)
    log.event("node.descriptors", limit=soft, hard=hard, reserve=budget.reserve.total,
              tcp_connection_cap=budget.tcp_connections, pipes=budget.pipes,
              udp_flow_caps=",".join(f"{k}={v}" for k, v in budget.udp_flows.items()))
    if not no_uvloop:
        _use_uvloop()
    from anycast_lb.forward.reactor import tune_gc  # deferred: keeps the other commands light

    tune_gc()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_run_node(cfg, run_dir, budget, ephemeral_ports, config.resolve()))
    except AnycastLBError as exc:
        log.error("node.failed", error=str(exc))
        click.echo(f"anycast-lb: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def _check_kernel_engine(cfg: NodeConfig) -> None:
    """The kernel engine's checks (nftables support on its interfaces,
    backends on the L2 segment), before anything starts: a clear error and
    exit 1 when they fail (docs/kernel.md, "Requirements and refusals").
    The node runs them again when it loads its table."""
    from anycast_lb.kernel import apply  # deferred: keeps the other commands light

    kernel = cfg.forwarding.kernel
    assert kernel is not None  # the config validator requires it
    backends = [ipaddress.IPv4Address(b.address) for s in cfg.services for b in s.backends]
    try:
        asyncio.run(apply.check_support(kernel.interface))
        if kernel.ingress is not None and kernel.ingress != kernel.interface:
            asyncio.run(apply.check_support(kernel.ingress))
        asyncio.run(apply.check_on_link(kernel.interface, backends))
    except AnycastLBError as exc:
        click.echo(f"anycast-lb: {exc}", err=True)
        sys.exit(EXIT_ERROR)


async def _run_node(cfg: NodeConfig, run_dir: Path | None, budget: Budget,
                    ephemeral_ports: bool = False, config_path: Path | None = None) -> None:
    from anycast_lb.node import Node  # deferred: keeps check-config light

    api_listen = (str(cfg.api.host_port[0]), 0) if ephemeral_ports else None
    node = Node(cfg, run_dir=run_dir, budget=budget, ephemeral_ports=ephemeral_ports,
                api_listen=api_listen, config_path=config_path)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.event("node.signal", signal=signal.Signals(signum).name, action="graceful stop")
            node.request_stop()
        else:
            log.event("node.signal", signal=signal.Signals(signum).name, action="exit now")
            sys.stderr.flush()
            # The kernel closes every socket; ExaBGP dies with us (PDEATHSIG).
            import os

            os._exit(EXIT_ERROR)

    reloads: set[asyncio.Task[object]] = set()

    async def reload() -> None:
        try:
            await node.reload()  # logs config.applied or config.refused itself
        except Exception as exc:  # a bug: log it, never let a reload take the node down
            log.error("config.reload_failed", error=f"{type(exc).__name__}: {exc}")

    def on_hangup() -> None:
        # The default action of SIGHUP is to terminate: a reload sent by an
        # operator (or a closed terminal) must never take the VIPs down.
        log.event("node.signal", signal="SIGHUP", action="reload")
        task: asyncio.Task[object] = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await node.run()


def _api_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--api``: ``HOST:PORT`` (IPv6 as ``[::1]:PORT``, port 1-65535), as
    ``api.listen`` reads it; click.BadParameter (exit 2) naming the fault."""
    if value is None:
        return None
    try:
        _, port = parse_host_port(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if port == 0:
        raise click.BadParameter("port 0 is not an address to call: give the port the node "
                                 "bound (its api.listening log line)")
    return value


_API = click.option("--api", "api", default=None, metavar="HOST:PORT", callback=_api_address,
                    help="The node's API address, in place of api.listen of the config file "
                         "(which still gives the token): for a node run with --ephemeral-ports, "
                         "the address of its api.listening log line.")


def _target(config: Path, api: str | None) -> NodeConfig:
    """CONFIG loaded as :func:`_load` does, its ``api.listen`` replaced by
    ``api`` (an ``--api`` value, already checked) when given."""
    cfg = _load(config)
    if api is None:
        return cfg
    return cfg.model_copy(update={"api": cfg.api.model_copy(update={"listen": api})})


def _api_call(cfg: NodeConfig, method: str, path: str, token: str | None = None,
              body: object = None) -> tuple[int, Any]:
    host, port = cfg.api.host_port
    url = f"http://{format_host_port(host, port)}{path}"
    data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            try:
                return response.status, json.loads(response.read() or b"null")
            except ValueError:
                click.echo(f"anycast-lb: {url} did not answer JSON: is it an anycast-lb API?", err=True)
                sys.exit(EXIT_ERROR)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"error": body.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"anycast-lb: cannot reach the node's API at {url}: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def _token(cfg: NodeConfig) -> str | None:
    if cfg.api.admin_token_file is None:
        return None
    try:
        return cfg.api.admin_token_file.read_text().strip()
    except OSError as exc:
        click.echo(f"anycast-lb: cannot read {cfg.api.admin_token_file}: {exc.strerror}", err=True)
        sys.exit(EXIT_ERROR)


def _admin(config: Path, api: str | None, path: str) -> None:
    cfg = _target(config, api)
    status, body = _api_call(cfg, "POST", path, _token(cfg))
    click.echo(json.dumps(body))
    if status != 200:
        sys.exit(EXIT_ERROR)


@main.command()
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path))
@click.option("--no-wait", is_flag=True,
              help="With consensus: exit 1 naming the holders when every drain slot is held.")
@click.option("--wait", "wait_end", is_flag=True,
              help="Then wait until the node is drained: withdrawn and no connection left.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: give up (exit 1) after this many seconds (default: no limit).")
@_API
def drain(config: Path, no_wait: bool, wait_end: bool, timeout: float | None,
          api: str | None) -> None:
    """Drain the running node: GRACEFUL_SHUTDOWN (RFC 8326), then withdraw.
    With consensus the node first takes a drain slot (``drain.max_concurrent``
    cluster-wide); while every slot is held this waits, saying who holds
    them, until the node drains. ``--wait`` then waits, printing progress to
    stderr, until no connection is left (exit 1 at ``--timeout``)."""
    started = time.monotonic()
    cfg = _target(config, api)
    if no_wait:
        status, body = _api_call(cfg, "POST", "/drain?no_wait=1", _token(cfg))
        click.echo(json.dumps(body))
        if status != 200:
            sys.exit(EXIT_ERROR)
    else:
        status, body = _api_call(cfg, "POST", "/drain", _token(cfg))
        if status == 202:
            holders = ", ".join(body.get("holders") or []) or "another node"
            click.echo(f"waiting for a drain slot, held by {holders}", err=True)
            while True:
                time.sleep(0.5)
                if timeout is not None and time.monotonic() - started > timeout:
                    click.echo(f"anycast-lb: no drain slot within {timeout:g} s", err=True)
                    sys.exit(EXIT_ERROR)
                code, st = _api_call(cfg, "GET", "/status")
                node = st.get("node", {}) if code == 200 else {}
                if node.get("draining"):
                    body = {"draining": True}
                    break
                if not node.get("drain_waiting"):
                    click.echo("anycast-lb: the drain request was withdrawn (undrain?)", err=True)
                    sys.exit(EXIT_ERROR)
        click.echo(json.dumps(body))
        if status not in (200, 202):
            sys.exit(EXIT_ERROR)
    if wait_end:
        _wait_drained(cfg, started, timeout)


_DRAIN_POLL_S = 0.5


def _wait_drained(cfg: NodeConfig, started: float, timeout: float | None) -> None:
    """Poll /status every 0.5 s until :func:`statusview.drain_progress` says
    drained (print ``drained``) or ``timeout`` s since ``started`` (exit 1).
    A progress line goes to stderr whenever it changes."""
    from anycast_lb.statusview import drain_progress

    last = ""
    while True:
        code, st = _api_call(cfg, "GET", "/status")
        if code != 200:
            click.echo(f"anycast-lb: /status answered {code}", err=True)
            sys.exit(EXIT_ERROR)
        try:
            done, line = drain_progress(st)
        except ValueError as exc:
            click.echo(f"anycast-lb: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        if line != last:
            click.echo(f"{time.monotonic() - started:6.1f} s  {line}", err=True)
            last = line
        if done:
            click.echo("drained")
            return
        if timeout is not None and time.monotonic() - started >= timeout:
            click.echo(f"anycast-lb: not drained within {timeout:g} s ({line})", err=True)
            sys.exit(EXIT_ERROR)
        time.sleep(_DRAIN_POLL_S)


@main.command()
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path))
@_API
def undrain(config: Path, api: str | None) -> None:
    """End a drain: announce again where healthy."""
    _admin(config, api, "/undrain")


@main.command()
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path))
@_API
def reload(config: Path, api: str | None) -> None:
    """Make the running node re-read its config file and apply it live.

    Prints ``applied`` (generation, digest, actions) or ``refused`` with the
    reason (exit 1). CONFIG gives the API address (or ``--api``) and the
    token; the node re-reads the file it was started with.
    """
    cfg = _target(config, api)
    status, body = _api_call(cfg, "POST", "/reload", _token(cfg))
    if isinstance(body, dict) and body.get("result") in ("applied", "refused"):
        if body["result"] == "applied":
            actions = "; ".join(body.get("actions") or []) or "nothing changed"
            click.echo(f"applied: generation {body['generation']} digest {body['digest']}: "
                       f"{actions}")
        else:
            click.echo(f"refused: {body['reason']} (still generation {body['generation']})")
    else:
        click.echo(json.dumps(body))
    if status != 200:
        sys.exit(EXIT_ERROR)


@main.command()
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The /status JSON, for machines.")
@_API
def status(config: Path, as_json: bool, api: str | None) -> None:
    """The running node's state as tables (node, services, backends);
    ``--json``: the whole /status document."""
    cfg = _target(config, api)
    code, body = _api_call(cfg, "GET", "/status")
    if as_json or code != 200:
        click.echo(json.dumps(body, indent=2))
    else:
        from anycast_lb.statusview import render

        click.echo(render(body), nl=False)
    if code != 200:
        sys.exit(EXIT_ERROR)


@main.group()
def backend() -> None:
    """Change one backend of the running node at runtime: drain, undrain,
    weight. Standalone the change is node-local (the file is not written);
    with consensus it is pushed as the cluster's next config revision and
    every node applies it."""


def _backend_change(config: Path, api: str | None, service: str, address: str, action: str,
                    body: object = None) -> None:
    cfg = _target(config, api)
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in (service, address))
    status, answer = _api_call(cfg, "POST", f"/backends/{quoted}/{action}", _token(cfg), body)
    if isinstance(answer, dict) and "change" in answer:
        if answer.get("applied"):
            where = (f"cluster revision {answer['revision']}" if answer["scope"] == "cluster"
                     else "this node only, not written to its file")
            click.echo(f"applied: {answer['change']} ({where})")
        elif answer.get("pending"):
            click.echo(f"pushed as cluster revision {answer['revision']}: {answer['change']}; "
                       "not yet applied on this node")
        else:
            click.echo(f"refused: {answer.get('reason')}")
    else:
        click.echo(f"anycast-lb: {answer.get('error') if isinstance(answer, dict) else answer}",
                   err=True)
    if status not in (200, 202):
        sys.exit(EXIT_ERROR)


_SERVICE = click.argument("service")
_ADDRESS = click.argument("address", metavar="ADDRESS:PORT")
_CONFIG = click.option("--config", "-c", "config", required=True,
                       type=click.Path(path_type=Path),
                       help="node file: API address (unless --api) and token")


@backend.command("drain")
@_SERVICE
@_ADDRESS
@_CONFIG
@_API
def backend_drain(service: str, address: str, config: Path, api: str | None) -> None:
    """No new flows to ADDRESS:PORT of SERVICE; established ones continue."""
    _backend_change(config, api, service, address, "drain")


@backend.command("undrain")
@_SERVICE
@_ADDRESS
@_CONFIG
@_API
def backend_undrain(service: str, address: str, config: Path, api: str | None) -> None:
    """Give ADDRESS:PORT of SERVICE new flows again (once up)."""
    _backend_change(config, api, service, address, "undrain")


@backend.command("weight")
@_SERVICE
@_ADDRESS
@click.argument("weight", type=click.IntRange(1, 1000))
@_CONFIG
@_API
def backend_weight(service: str, address: str, weight: int, config: Path,
                   api: str | None) -> None:
    """Set the Maglev weight of ADDRESS:PORT of SERVICE (1..1000)."""
    _backend_change(config, api, service, address, "weight", {"weight": weight})


@main.command("exabgp-config")
@click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path))
def exabgp_config(config: Path) -> None:
    """Print the ExaBGP config (neighbors and the announcer process stanza)
    for people who run ExaBGP themselves."""
    cfg = _load(config)
    if cfg.bgp is None:
        click.echo(f"anycast-lb: {config} has no bgp section", err=True)
        sys.exit(EXIT_CONFIG)
    from anycast_lb.bgp.exabgp import exabgp_config_text

    click.echo(exabgp_config_text(cfg, config.resolve()), nl=False)


@main.command()
def schema() -> None:
    """Print the JSON schema of the config file."""
    click.echo(json_schema(), nl=False)


@main.command("backend-setup")
@click.option("--vip", "vips", required=True, multiple=True,
              help="A VIP this backend serves (IPv4; repeat for several).")
@click.option("--apply", "do_apply", is_flag=True,
              help="Apply it here (root): VIP on lo, arp_ignore=1, arp_announce=2.")
def backend_setup(vips: tuple[str, ...], do_apply: bool) -> None:
    """Print the backend-side set-up for forwarding.engine: kernel (direct
    server return); with --apply, apply it on this host (docs/kernel.md)."""
    from anycast_lb.kernel import backend  # deferred: keeps the other commands light

    try:
        addrs = [ipaddress.IPv4Address(v) for v in vips]
    except ValueError as exc:
        click.echo(f"anycast-lb: --vip: {exc} (an IPv4 address)", err=True)
        sys.exit(EXIT_CONFIG)
    text = backend.script(addrs)
    if not do_apply:
        click.echo(text, nl=False)
        return
    import subprocess

    try:
        for a in addrs:
            done = subprocess.run(backend.vip_argv(a), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise OSError(f"{' '.join(backend.vip_argv(a))}: {done.stderr.strip()}")
        for key, value in backend.SYSCTLS:
            (Path("/proc/sys") / key).write_text(f"{value}\n")
    except OSError as exc:
        click.echo(f"anycast-lb: backend-setup: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(text, nl=False)
    click.echo("# applied", err=True)


@main.command("status-schema")
def status_schema() -> None:
    """Print the JSON schema of GET /status (docs/status.schema.json)."""
    from anycast_lb.status import json_schema as status_json_schema

    click.echo(status_json_schema(), nl=False)


main.add_command(lab)
main.add_command(cluster)
main.add_command(vip)
