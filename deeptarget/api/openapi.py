"""The API's routes as data, and the OpenAPI 3.1 document generated from them (served at ``/openapi.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deeptarget import __version__
from deeptarget.api.models import ErrorBody

API_KEY_HEADER = "X-API-Key"
PART_NAME_PATTERN = r'^[^\u0000-\u001f\u007f"\\]*$'


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # JSON schema type: integer, number, string, boolean
    description: str
    required: bool = False
    where: str = "query"  # or "path"
    format: str | None = None
    minimum: float | None = None  # bounds the handler checks too (it reads them from here)
    maximum: float | None = None
    default: float | None = None
    min_length: int | None = None
    pattern: str | None = None  # a string's regular expression (the handler checks it too)
    enum: tuple[str, ...] | None = None
    default_text: str | None = None  # a string's default

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type}
        enum = list(self.enum) if self.enum else None
        default = self.default if self.default is not None else self.default_text
        for key, value in (("format", self.format), ("minimum", self.minimum), ("maximum", self.maximum),
                           ("default", default), ("minLength", self.min_length), ("pattern", self.pattern),
                           ("enum", enum)):  # fmt: skip
            if value is not None:
                schema[key] = value
        return schema


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    response: type[BaseModel] | None
    params: tuple[Param, ...] = ()
    upload: bool = False  # takes an image as the body or as multipart field "image"
    binary: str | None = None  # the answer may be this media type instead of JSON (image/png), by a parameter
    # The body is records of this model: one JSON object or a JSON array of them, or (with ``request_lines``) JSON
    # lines, one object per line. Its schema is generated from the model, in validation mode.
    request: type[BaseModel] | None = None
    request_lines: bool = False
    request_description: str | None = None
    status: int = 200  # the answer when it goes well (202: accepted, the work happens later)
    # (status, model, description): statuses whose body can be a response model (e.g. 400 with the rejected
    # records) as well as the ``ErrorBody`` any error can have.
    error_models: tuple[tuple[int, type[BaseModel], str], ...] = ()
    write: bool = False  # needs the API key
    errors: tuple[int, ...] = (400,)
    text: bool = False  # the answer is text/plain (Prometheus)
    document: bool = False  # the answer is a JSON object with no model (this document)
    extra: dict[str, Any] = field(default_factory=dict)


def openapi_document(operations: list[Operation]) -> dict[str, Any]:
    responses_models = {op.response for op in operations if op.response is not None} | {ErrorBody}
    responses_models |= {model for op in operations for _, model, _ in op.error_models}
    request_models = {op.request for op in operations if op.request is not None}
    refs, definitions = models_json_schema(
        [(model, "serialization") for model in sorted(responses_models, key=lambda m: m.__name__)]
        + [(model, "validation") for model in sorted(request_models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        success: dict[str, Any] = {"description": _SUCCESS.get(op.status, "OK")}
        if op.response is not None:
            success["content"] = {"application/json": {"schema": refs[(op.response, "serialization")]}}
            if op.binary:
                success["content"][op.binary] = {"schema": {"type": "string", "format": "binary"}}
        elif op.text:
            success["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif op.document:
            success["content"] = {"application/json": {"schema": {"type": "object"}}}
        responses[str(op.status)] = success
        error_schema = refs[(ErrorBody, "serialization")]
        body_models = {status: (model, description) for status, model, description in op.error_models}
        for status in sorted({*op.errors, *body_models, *((401, 403) if op.write else ())}):
            schema, description = error_schema, _STATUS[status]
            if status in body_models:
                model, description = body_models[status]
                schema = {"anyOf": [refs[(model, "serialization")], error_schema]}
            content = {"application/json": {"schema": schema}}
            responses[str(status)] = {"description": description, "content": content}
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "description": p.description,
                    "schema": p.schema(),
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
                    "multipart/form-data": {  # other parts are skipped
                        "schema": {
                            "type": "object",
                            "properties": {"image": {"type": "string", "format": "binary"}},
                            "required": ["image"],
                            # a part's name travels in its Content-Disposition header: no controls, quotes, backslashes
                            "propertyNames": {"pattern": PART_NAME_PATTERN},
                        }
                    },
                },
            }
        if op.request is not None:
            operation["requestBody"] = _records_body(op, refs[(op.request, "validation")])
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


def _records_body(op: Operation, record: dict[str, Any]) -> dict[str, Any]:
    assert op.request is not None
    name = op.request.__name__
    forms = f"application/json: one {name} object or an array of them"
    if op.request_lines:
        forms += f"; application/x-ndjson (JSON lines): one {name} object per line, blank lines skipped"
    array = {"type": "array", "items": record, "minItems": 1}  # an empty array carries nothing: a 400
    content: dict[str, Any] = {"application/json": {"schema": {"anyOf": [record, array]}}}
    if op.request_lines:
        # OpenAPI 3.1 has no schema for a sequence of values: this is the schema of each line.
        content["application/x-ndjson"] = {"schema": record}
    description = f"{op.request_description} " if op.request_description else ""
    return {"required": True, "description": f"{description}{forms}.", "content": content}


_SUCCESS = {200: "OK", 201: "Created", 202: "Accepted"}
_STATUS = {
    400: "Bad request (a parameter or the upload is invalid)",
    401: "Missing or wrong API key",
    403: "Write endpoints are disabled (no API key configured)",
    404: "Not found",
    408: "The request body did not arrive in time (api_body_timeout_s)",
    413: "Too large: the upload or body (max_upload_bytes), or too many records (api_max_ingest_records)",
    422: "The upload is not a usable image",
    503: "Not ready (no index or model yet), busy (uploads; Retry-After says when to retry) or a dependency is down",
}
