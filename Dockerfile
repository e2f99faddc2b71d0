# responses-gateway in a container: `docker build -t responses-gateway .`, then
# `docker run -p 8080:8080 responses-gateway` (embedded store, built-in simulated model), or `docker compose up`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A plain (not editable) install of the package; the sources are not kept.
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY runs /src/runs
COPY simulator /src/simulator
COPY storage /src/storage
RUN pip install /src && rm -rf /src

# The image's own config (listen on every interface, embedded store); compose mounts its own over it.
COPY container/config.yaml /etc/responses-gateway/config.yaml

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
USER gateway

EXPOSE 8080
# No curl in slim images: the probe is Python's own HTTP client. /healthz: the process is alive and serving.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# SIGTERM (docker stop) drains: running responses get shutdown.grace_seconds, then are handed over.
ENTRYPOINT ["responses-gateway"]
CMD ["serve", "--config", "/etc/responses-gateway/config.yaml"]
