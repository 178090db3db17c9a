"""GET /metrics: Prometheus text format from prometheus-client's default registry. No auth, like /healthz, so
Prometheus needs no secret: the numbers hold no text of the traffic (reviewer names are the only names)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (names and meanings: k8s/METRICS.md)", response_class=Response)
def metrics() -> Response:
    # A plain def: FastAPI runs it in a worker thread, so rendering never holds up /classify on the event loop.
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
