# syntax=docker/dockerfile:1
# anycast-lb node image: the node and ExaBGP (a dependency, started by the
# node as its child) in one virtual environment, run as a non-root user.
#   docker build -t anycast-lb:dev .
#   docker run --network host --cap-add NET_ADMIN --cap-add NET_RAW \
#       -v /etc/anycast-lb:/etc/anycast-lb:ro anycast-lb:dev
# The default user cannot use capabilities (Docker grants none to a non-root
# user's process); a node with a `cluster:` section (flow survival: nftables
# and policy routing, CAP_NET_ADMIN and CAP_NET_RAW) or a VIP port below
# 1024 on the host network runs with `--user 0` and those --cap-add flags.
# docs/production.md has the details.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/anycast-lb
COPY pyproject.toml README.md LICENSE ./
COPY anycast_lb ./anycast_lb
# anycast_lb/lab/templates links to labs/frr (the lab's FRR templates).
COPY labs/frr ./labs/frr
RUN /opt/anycast-lb/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/anycast-lb/bin/anycast-lb --help >/dev/null \
    && /opt/anycast-lb/bin/exabgp --version >/dev/null

FROM python:3.11-slim-bookworm AS runtime
# iproute2: the VIP on lo and policy routing; nftables: flow survival's
# steering rules.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 nftables \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/anycast-lb \
        --create-home --shell /usr/sbin/nologin anycast-lb \
    && install -d -o anycast-lb -g anycast-lb -m 0750 /run/anycast-lb /etc/anycast-lb
COPY --from=build /opt/anycast-lb /opt/anycast-lb
ENV PATH=/opt/anycast-lb/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ANYCAST_LB_API=127.0.0.1:9180
USER anycast-lb
WORKDIR /var/lib/anycast-lb
# SIGTERM drains: GRACEFUL_SHUTDOWN, withdraw, established connections end
# (up to drain.timeout), then ExaBGP stops. Give `docker stop` a --time
# (-t) longer than announce_grace + drain.timeout.
STOPSIGNAL SIGTERM
# /healthz answers 200 while the node's loop runs (docs/api.md); set
# ANYCAST_LB_API to the config's api.listen when it differs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://' + os.environ['ANYCAST_LB_API'] + '/healthz', timeout=2)"]
ENTRYPOINT ["anycast-lb"]
CMD ["run", "--config", "/etc/anycast-lb/node.yaml", "--run-dir", "/run/anycast-lb"]
