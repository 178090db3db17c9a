"""Responses the service built itself, written to JSON once.

Given a model instance, FastAPI dumps it to Python objects, validates those against the route's response_model
again, dumps them once more and runs json.dumps over the result: four passes over an answer whose every field was
already validated when it was built. On the classifying routes, which carry nearly all of the traffic, pydantic-core
writes the JSON bytes in one pass instead. The route keeps its response_model, so /docs shows the same schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import Response


class ModelJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if not isinstance(content, BaseModel):
            raise TypeError(f"ModelJSONResponse takes a pydantic model, not {type(content).__name__}")
        return content.__pydantic_serializer__.to_json(content)
