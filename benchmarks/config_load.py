"""Config file load time: libyaml with the loader's checks against PyYAML's
pure-Python ``safe_load``.

Writes a generated config of ``--services`` services with 50 backends each
(360 services is about 1 MB, under the 1 MiB limit) and times, ``--runs``
times each, the two ways of reading it into a validated ``NodeConfig``:

- ``pure-python``: ``yaml.safe_load`` then ``parse_config`` (how the file
  was read before the C loader);
- ``load_config``: as shipped (:mod:`anycast_lb.yamlload`: bounded read,
  UTF-8, depth, alias and duplicate-key checks, libyaml when available).

Median wall time in s. Figures depend on what else the machine runs:
compare the rows of one run. ::

    .venv/bin/python benchmarks/config_load.py [--services N] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from anycast_lb.config import load_config, parse_config


def document(services: int) -> dict[str, Any]:
    return {"node": {"name": "lb1"}, "services": [
        {"name": f"svc{s}", "vip": f"198.51.{100 + s // 250}.{s % 250 + 1}", "port": 80,
         "backends": [{"address": f"203.0.113.{b + 1}", "port": 8080, "weight": 1} for b in range(50)],
         "health": {"kind": "http", "path": "/healthz", "host": "www.example.com"}}
        for s in range(services)
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=360)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.yaml"
        path.write_text(yaml.safe_dump(document(args.services), sort_keys=False))
        print(f"file: {path.stat().st_size} bytes, {args.services} services x 50 backends, "
              f"libyaml {'yes' if yaml.__with_libyaml__ else 'no'}")

        def pure() -> object:
            return parse_config(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))

        for name, load in (("pure-python", pure), ("load_config", lambda: load_config(path))):
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                load()
                times.append(time.perf_counter() - start)
            print(f"{name:12s} median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
