"""``pump.pair`` builds the same two directions as ``Direction(...)`` does."""

from __future__ import annotations

from anycast_lb.forward.pump import Direction, pair


def _fields(d: Direction) -> dict[str, object]:
    return {name: getattr(d, name) for name in Direction.__slots__ if hasattr(d, name)}


def test_pair_sets_every_field_as_the_constructor_does() -> None:
    client, backend = object(), object()
    for tap in (True, False):
        up, down = pair(client, backend, tap)  # type: ignore[arg-type]
        assert _fields(up) == _fields(Direction(client, backend, True, tap))  # type: ignore[arg-type]
        assert _fields(down) == _fields(Direction(backend, client, False, tap))  # type: ignore[arg-type]
        assert up.src is client and up.dst is backend and down.src is backend and down.dst is client
