# One image for every process: api, worker, migrate (and `kdq serve` for a single box).
#   docker build -t kdq .                                  # CPU torch (default)
#   docker build -t kdq:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    KDQ_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 kdq \
    && mkdir -p /data && chown kdq:kdq /data

WORKDIR /app
# torch first, from the chosen index, so the layer is cached across code changes
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
# editable: `kdq migrate` finds migrations/ beside the service package
RUN pip install -e .

USER kdq
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["kdq", "api", "--host", "0.0.0.0", "--port", "8000"]
