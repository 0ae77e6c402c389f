# undo-proxy: the proxy daemon. btrfs-progs for snapshots of the (host, btrfs) volume.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends btrfs-progs && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/undo-proxy
COPY pyproject.toml README.md ./
COPY undo_proxy ./undo_proxy
COPY verbs ./verbs
COPY storage ./storage
COPY migrations ./migrations
RUN pip install --no-cache-dir .
ENV UNDO_PROXY_CONFIG=/etc/undo-proxy/undo-proxy.toml
ENTRYPOINT ["undo-proxy"]
CMD ["serve"]
