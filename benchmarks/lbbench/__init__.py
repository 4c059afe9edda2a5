"""The parts of ``benchmarks/forwarder_vs_haproxy.py`` (anycast-lb's forwarder
against HAProxy on loopback).

- ``configs``: the pure config generators (HAProxy, anycast-lb, nginx) for
  one topology of VIP, ports and backends.
- ``procfs``: CPU time, RSS, file descriptors and kernel memory read from
  /proc, for a process and all its threads and descendants.
- ``report``: medians, ratios, the targets and the printed table.
- ``processes``: starting pinned processes, readiness with deadlines, and
  cleanup by PID.
- ``loads``: the bounded load runs (wrk, iperf3, ``loadgen``, idle
  connections).
"""
