"""The API's routes as data, and the OpenAPI 3.1 document generated from them (served at ``/openapi.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deeptarget import __version__
from deeptarget.api.models import ErrorBody

API_KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # JSON schema type: integer, number, string, boolean
    description: str
    required: bool = False
    where: str = "query"  # or "path"
    format: str | None = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    response: type[BaseModel] | None
    params: tuple[Param, ...] = ()
    upload: bool = False  # takes an image as the body or as multipart field "image"
    write: bool = False  # needs the API key
    errors: tuple[int, ...] = (400,)
    extra: dict[str, Any] = field(default_factory=dict)


def openapi_document(operations: list[Operation]) -> dict[str, Any]:
    models = {op.response for op in operations if op.response is not None} | {ErrorBody}
    refs, definitions = models_json_schema(
        [(model, "serialization") for model in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        if op.response is not None:
            schema = refs[(op.response, "serialization")]
            responses["200"] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        else:
            responses["200"] = {"description": "OK"}
        error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
        for status in sorted({*op.errors, *((401, 403) if op.write else ())}):
            responses[str(status)] = {"description": _STATUS[status], "content": error}
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "description": p.description,
                    "schema": {"type": p.type, **({"format": p.format} if p.format else {})},
                }
                for p in op.params
            ],
            "responses": responses,
        }
        if op.upload:
            operation["requestBody"] = {
                "required": True,
                "description": "The image: the raw body, or multipart field 'image'. Size and pixel limits apply.",
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}
                    },
                },
            }
        if op.write:
            operation["security"] = [{"ApiKey": []}]
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "deeptarget", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}},
        },
    }


_STATUS = {
    400: "Bad request (a parameter or the upload is invalid)",
    401: "Missing or wrong API key",
    403: "Write endpoints are disabled (no API key configured)",
    404: "Not found",
    413: "Upload too large",
    422: "The upload is not a usable image",
    503: "Not ready (no index or model yet) or a dependency is down",
}
