"""The OpenAPI 3.1 document, generated from the route table and the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from orderflow.app.routes import OPERATIONS, Operation

REF = "#/components/schemas/{model}"
TEXT = {"type": "string"}


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Request bodies in validation mode, answers in serialization mode."""
    seen: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {}
    for op in OPERATIONS:
        if op.body is not None:
            seen[op.body.__name__] = (op.body, "validation")
        for model, _ in op.responses.values():
            if model is not None:
                seen[model.__name__] = (model, "serialization")
    return list(seen.values())


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _operation(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": list(op.tags),
        "responses": {
            str(status): (
                {
                    "description": text,
                    "content": {"application/json": {"schema": _ref(model)}},
                    **({"links": op.links[status]} if status in op.links else {}),
                    **(
                        {
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "true when this is a stored answer replayed",
                                    "schema": {"type": "string", "enum": ["true"]},
                                }
                            }
                        }
                        if op.idempotent and status < 300
                        else {}
                    ),
                }
                if model
                else {
                    "description": text,
                    "content": {op.media_type: {"schema": {"type": "string"}}},
                }
            )
            for status, (model, text) in sorted(op.responses.items())
        },
    }
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "A ULID",
        }
        for name in _path_names(op.path)
    ]
    if op.idempotent:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[!-~]+$",
                },
                "description": "Unique per request meant once; printable ASCII; per caller",
            }
        )
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "schema": q.schema,
            "description": q.description,
        }
        for q in op.query
    ]
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    doc["security"] = [{"bearerAuth": []}] if op.auth else []
    return doc


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def openapi_document() -> dict[str, Any]:
    _, definitions = models_json_schema(_models(), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orderflow",
            "version": "1.0.0",
            "description": "Order-fulfillment saga service: carts, orders, returns.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
