"""Backend health checking: probes (tcp/http/exec/udp/dns/none), the pure rise/fall
machine, and the monitor that runs them on a fixed schedule and updates pools."""

from anycast_lb.health.hysteresis import Hysteresis, State
from anycast_lb.health.monitor import HealthMonitor, OnChange, OnCheck
from anycast_lb.health.probes import (
    DnsProbe,
    ExecProbe,
    HttpProbe,
    NoneProbe,
    Probe,
    ProbeFactory,
    ProbeResult,
    TcpProbe,
    UdpProbe,
    make_probe,
    make_session,
)

__all__ = [
    "DnsProbe",
    "ExecProbe",
    "HealthMonitor",
    "HttpProbe",
    "Hysteresis",
    "NoneProbe",
    "OnChange",
    "OnCheck",
    "Probe",
    "ProbeFactory",
    "ProbeResult",
    "State",
    "TcpProbe",
    "UdpProbe",
    "make_probe",
    "make_session",
]
