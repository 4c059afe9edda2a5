"""ExaBGPSupervisor with real child processes (stand-ins for ExaBGP)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from anycast_lb.bgp.exabgp import ExaBGPSupervisor
from anycast_lb.errors import AnnouncerError
from tests.procs import exited
from tests.waiting import wait_until


class StepClock:
    """A Clock whose sleeps return at once (recorded) and whose monotonic
    time moves ``step`` seconds per read, so each child "ran" ``step`` s."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        self.now += self.step
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


async def run_until(sup: ExaBGPSupervisor, clock: StepClock, sleeps: int) -> None:
    task = asyncio.create_task(sup.run(asyncio.Event()))
    await wait_until(lambda: len(clock.sleeps) >= sleeps, timeout=20, what="restarts")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_restart_backoff_doubles_to_30_s() -> None:
    clock = StepClock(step=0.0)
    sup = ExaBGPSupervisor(["/bin/true"], {}, clock)
    await run_until(sup, clock, 9)
    assert clock.sleeps[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


async def test_backoff_resets_after_60_s_up() -> None:
    clock = StepClock(step=61.0)
    sup = ExaBGPSupervisor(["/bin/true"], {}, clock)
    await run_until(sup, clock, 4)
    assert clock.sleeps[:4] == [0.5, 0.5, 0.5, 0.5]


async def test_missing_executable_raises(tmp_path: Path) -> None:
    sup = ExaBGPSupervisor([str(tmp_path / "no-exabgp")], {}, StepClock(0.0))
    with pytest.raises(AnnouncerError):
        await sup.run(asyncio.Event())


async def test_env_and_cwd_reach_the_child(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    code = "import os; print(os.environ['exabgp_api_cli'], os.getcwd(), flush=True)"
    clock = StepClock(0.0)
    sup = ExaBGPSupervisor([sys.executable, "-c", code], {"exabgp_api_cli": "false"},
                           clock, cwd=tmp_path, log_file=out)
    await run_until(sup, clock, 1)
    assert out.read_text().splitlines()[0] == f"false {tmp_path}"


async def test_cancel_terminates_then_kills_a_child_ignoring_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    sup = ExaBGPSupervisor([sys.executable, "-c", code], {}, StepClock(0.0), log_file=out)
    started = asyncio.Event()
    task = asyncio.create_task(sup.run(started))
    await asyncio.wait_for(started.wait(), 10)
    pid = sup.pid
    assert pid is not None
    await wait_until(lambda: out.exists() and "ready" in out.read_text(), timeout=10,
                     what="child ready")
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 1.9 <= time.monotonic() - began < 5  # SIGTERM ignored, SIGKILL after 2 s
    assert exited(pid) and sup.pid is None


HELPER = """
import asyncio, sys
from anycast_lb.bgp.exabgp import ExaBGPSupervisor
from anycast_lb.clock import SystemClock

async def main():
    sup = ExaBGPSupervisor([sys.executable, "-c", "import time; time.sleep(60)"], {},
                           SystemClock())
    started = asyncio.Event()
    task = asyncio.create_task(sup.run(started))
    await started.wait()
    print(sup.pid, flush=True)
    await task

asyncio.run(main())
"""


async def test_child_dies_with_the_node() -> None:
    # PR_SET_PDEATHSIG: SIGKILL of the node (no cleanup code runs) still ends ExaBGP.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    node = await asyncio.create_subprocess_exec(sys.executable, "-c", HELPER, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    assert node.stdout is not None
    async with asyncio.timeout(20):
        child = int(await node.stdout.readline())
    assert not exited(child)
    node.send_signal(signal.SIGKILL)
    await node.wait()
    await wait_until(lambda: exited(child), timeout=10, what="ExaBGP stand-in to die")


async def test_child_runs_in_its_own_session(tmp_path: Path) -> None:
    # A signal to the node's process group (Ctrl-C, systemd) must not reach it.
    sup = ExaBGPSupervisor([sys.executable, "-c", "import time; time.sleep(60)"], {},
                           StepClock(0.0))
    started = asyncio.Event()
    task = asyncio.create_task(sup.run(started))
    try:
        await asyncio.wait_for(started.wait(), 10)
        pid = sup.pid
        assert pid is not None
        assert os.getsid(pid) == pid != os.getsid(0)
        assert os.getpgid(pid) != os.getpgid(0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_no_restart_once_a_stop_has_begun(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    code = "import time; print('ready', flush=True); time.sleep(60)"
    clock = StepClock(0.0)
    sup = ExaBGPSupervisor([sys.executable, "-c", code], {}, clock, log_file=out)
    started = asyncio.Event()
    task = asyncio.create_task(sup.run(started))
    try:
        await asyncio.wait_for(started.wait(), 10)
        pid = sup.pid
        assert pid is not None
        await wait_until(lambda: out.exists() and "ready" in out.read_text(), timeout=10,
                         what="child ready")
        sup.begin_stop()
        os.kill(pid, signal.SIGTERM)  # ExaBGP exits during the node's stop
        await wait_until(lambda: exited(pid), timeout=10, what="child exit")
        await wait_until(lambda: sup.pid is None, timeout=5, what="child reaped")
        # Give a restart every chance to happen (the StepClock's backoff
        # sleeps return at once): it must not.
        for _ in range(50):
            await asyncio.sleep(0)
        assert sup.pid is None and sup.restarts == 0 and clock.sleeps == []
        assert not task.done()  # it waits to be cancelled, as the speaker expects
        await sup.stop()  # idempotent with nothing running
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert out.read_text().count("ready") == 1
