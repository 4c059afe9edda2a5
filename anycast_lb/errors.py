"""The one exception hierarchy of anycast-lb.

::

    AnycastLBError
    +-- ConfigError            the config file is missing, unreadable or invalid
    +-- BindError              a forwarder or the HTTP API cannot bind its address
    +-- WorkerProtocolError    a relay worker pipe line is malformed
    +-- BackendError           no backend of a pool could take a flow
    |   +-- NoHealthyBackend   the pool has no backend in state up
    |   +-- UnknownBackend     runtime control named no such service or backend
    +-- ConnectionStateError   a TCP engine fed its connection machine an event
                               that cannot happen in its phase (a bug)
    +-- AnnouncerError         the ExaBGP side cannot be driven
    |   +-- UnsafeAttribute    a BGP attribute would inject an API command
    +-- ClusterError           the flow-survival cluster cannot run its part
    |   +-- ClusterWireError   a sync datagram is malformed
    |       +-- ClusterAuthError   its MAC is wrong or its key unknown
    +-- KernelEngineError      the kernel engine's nftables table cannot be
    |                          checked, loaded or changed
    +-- ConsensusError         the etcd cluster cannot answer as asked
    |   +-- ConsensusUnavailable   no answer within request_timeout (etcd down,
    |   |                          unreachable, or without quorum)
    |   +-- ConsensusConflict      a compare-and-swap lost: the key moved on
    |   +-- ConsensusCompacted     the revision asked for was compacted away
    |   +-- LeaseLost              the lease expired or was revoked
    |   +-- ConsensusDataError     a stored document is not what the key
    |                              layout says (bad JSON, unknown revision)
    +-- L2Error                a VIP cannot be added, removed or announced on
                               its L2 segment (no interface, no CAP_NET_RAW),
                               or put on or taken off lo (manage_address)
    +-- LabError               the namespace lab cannot be built or used
        +-- UnsafeLab          a lab prefix overlaps the root namespace, or a
                               traffic tool runs outside its lab namespace

OS errors are translated at the edge with ``raise ... from exc``; only the
CLI turns these into exit codes (2 for ConfigError, 1 for the rest).
"""

from __future__ import annotations


class AnycastLBError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AnycastLBError):
    """The config is invalid.

    ``problems`` holds one line per problem, each naming the field path
    (``services[0].backends[1].port: ...``).
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class BindError(AnycastLBError):
    """A listening socket could not be bound (address in use, not local...)."""


class WorkerProtocolError(AnycastLBError):
    """A line on a relay worker's pipe is not a valid message (logged and
    skipped; a bad first line ends the worker)."""


class BackendError(AnycastLBError):
    """No backend could take a flow."""


class NoHealthyBackend(BackendError):
    """The pool has no backend in state up."""


class UnknownBackend(BackendError):
    """``backend drain|undrain|weight`` named a service or backend the
    config in effect does not have."""


class ConnectionStateError(AnycastLBError):
    """An event that cannot happen in the connection machine's phase
    (``forward.connection``): an engine bug, never a peer's doing."""


class AnnouncerError(AnycastLBError):
    """ExaBGP cannot be driven (bad config, process gone, protocol error)."""


class UnsafeAttribute(AnnouncerError):
    """A BGP attribute string holds a character that would break an API line."""


class ClusterError(AnycastLBError):
    """The cluster cannot run its part (sync bind, nftables, policy routing)."""


class KernelEngineError(AnycastLBError):
    """The kernel engine cannot run: nft or the kernel lacks what its table
    needs, or a transaction was refused (the kernel is then unchanged)."""


class ClusterWireError(ClusterError):
    """A sync datagram is malformed (dropped and counted, never fatal)."""


class ClusterAuthError(ClusterWireError):
    """A sync datagram fails authentication: bad MAC or unknown key id
    (dropped and counted, never fatal)."""


class ConsensusError(AnycastLBError):
    """The etcd cluster cannot answer as asked (``anycast_lb.consensus``).

    Raised only by ``consensus.store``, which maps the client library's
    errors once, with ``raise ... from exc``."""


class ConsensusUnavailable(ConsensusError):
    """No answer within the request timeout: etcd is down, unreachable or
    has lost quorum. Never a reason to withdraw a VIP (fail-static)."""


class ConsensusConflict(ConsensusError):
    """A compare-and-swap lost: the key changed since the revision it was
    based on (a concurrent ``cluster push``, a drain slot taken)."""


class ConsensusCompacted(ConsensusError):
    """The etcd revision asked for was compacted away; re-read at the
    current revision."""


class LeaseLost(ConsensusError):
    """The lease expired or was revoked: the keys under it are gone."""


class ConsensusDataError(ConsensusError):
    """A stored document is not what the key layout says (bad JSON, a
    config revision that does not exist)."""


class L2Error(AnycastLBError):
    """A VIP cannot be added, removed or announced on its L2 segment
    (``anycast_lb.election.l2``), or put on or taken off ``lo``
    (``manage_address``): interface missing, no permission."""


class LabError(AnycastLBError):
    """The namespace lab cannot be built, used or torn down."""


class UnsafeLab(LabError):
    """Refused for network safety (prefix overlap, wrong namespace)."""


def first_leaf(group: BaseExceptionGroup[AnycastLBError]) -> AnycastLBError:
    """The first error of ``group`` that is not itself a group (depth
    first): the one a ``TaskGroup`` of parts raises for, unwrapped."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, AnycastLBError)
    return error
