"""GET /metrics: Prometheus text format from prometheus-client's default registry (with several workers, every
worker's values: service/workers.py). No auth, like /healthz, so Prometheus needs no secret: the numbers hold no
text of the traffic (reviewer names are the only names)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from guardloop.service.workers import metrics_registry
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (names and meanings: k8s/METRICS.md)", response_class=Response)
def metrics() -> Response:
    # A plain def: FastAPI runs it in a worker thread, so rendering never holds up /classify on the event loop.
    return Response(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)
