"""The billing API's OpenAPI 3.1 document, served at /openapi.json. docs/billing-api.md explains it in prose."""

from __future__ import annotations

from typing import Any

_MONEY = {"type": "string", "pattern": r"^-?\d+\.\d{2}$", "description": "decimal string, never a float"}
_TIME = {"type": "string", "format": "date-time"}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ENTITY_PARAM = {"name": "entity", "in": "path", "required": True, "schema": {"enum": ["customers", "invoices"]}}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meanings = {
        400: "invalid request",
        401: "missing or wrong API key",
        404: "no such record or resource",
        429: "rate limited; see Retry-After (seconds)",
        500: "server error (also 502, 503): retry",
    }
    return {str(c): _resp(_ERROR, meanings[c]) for c in codes}


def openapi_document() -> dict[str, Any]:
    since = {"name": "updated_since", "in": "query", "schema": _TIME, "description": "records with updated_at >= this"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Billing platform API (simulator)",
            "version": "1.0",
            "description": "Listing, counting and bulk fetching of customers and invoices. Over the rate limit the "
            "platform may answer list calls with 200 and an empty page, and bulk calls with 200 and fewer records "
            "than asked: clients must detect this (see docs/billing-api.md).",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/{entity}": {
                "get": {
                    "summary": "List records changed since a time, oldest change first",
                    "parameters": [
                        _ENTITY_PARAM,
                        since,
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "description": "page size; at most 100 for full records, 1000 with light fields",
                        },
                        {
                            "name": "fields",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "comma-separated fields, e.g. id,updated_at for light listing",
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "cursor accounts: next_cursor of the previous page",
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "offset accounts: records to skip, ordered by updated_at",
                        },
                    ],
                    "responses": {"200": _resp({"$ref": "#/components/schemas/Page"}), **_errors(400, 401, 429, 500)},
                }
            },
            "/v1/{entity}/count": {
                "get": {
                    "summary": "How many records changed since a time",
                    "parameters": [_ENTITY_PARAM, since],
                    "responses": {
                        "200": _resp({"type": "object", "properties": {"count": {"type": "integer"}}}),
                        **_errors(400, 401, 429, 500),
                    },
                }
            },
            "/v1/{entity}/bulk": {
                "post": {
                    "summary": "Fetch up to 100 records by id; unknown ids are left out",
                    "parameters": [_ENTITY_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["ids"],
                                    "properties": {
                                        "ids": {"type": "array", "maxItems": 100, "items": {"type": "string"}}
                                    },
                                }
                            }
                        },
                    },
                    "responses": {"200": _resp({"$ref": "#/components/schemas/Page"}), **_errors(400, 401, 429, 500)},
                }
            },
            "/v1/{entity}/{id}": {
                "get": {
                    "summary": "Fetch one record",
                    "parameters": [_ENTITY_PARAM, _ID_PARAM],
                    "responses": {
                        "200": _resp(
                            {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/Customer"},
                                    {"$ref": "#/components/schemas/Invoice"},
                                ]
                            }
                        ),
                        **_errors(401, 404, 429, 500),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Page": {
                    "type": "object",
                    "required": ["data", "has_more"],
                    "properties": {
                        "data": {"type": "array", "items": {"type": "object"}},
                        "has_more": {"type": "boolean"},
                        "next_cursor": {"type": ["string", "null"]},
                        "offset": {"type": "integer"},
                        "limit": {"type": "integer"},
                    },
                },
                "Address": {
                    "type": "object",
                    "properties": {
                        "line1": {"type": "string"},
                        "city": {"type": "string"},
                        "postal_code": {"type": "string"},
                        "country": {"type": "string", "pattern": "^[A-Z]{2}$", "description": "ISO 3166-1 alpha-2"},
                    },
                },
                "Customer": {
                    "type": "object",
                    "required": ["id", "name", "status", "currency", "updated_at", "version"],
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string", "maxLength": 160},
                        "email": {"type": ["string", "null"]},
                        "phone": {"type": ["string", "null"]},
                        "address": {"$ref": "#/components/schemas/Address"},
                        "status": {"enum": ["active", "suspended", "churned"]},
                        "currency": {"type": "string", "description": "ISO 4217"},
                        "balance": _MONEY,
                        "mrr": _MONEY,
                        "go_live_date": {"type": ["string", "null"], "format": "date"},
                        "provider_count": {"type": "integer", "minimum": 0},
                        "product_flags": {"type": "array", "items": {"type": "string"}},
                        "created_at": _TIME,
                        "updated_at": _TIME,
                        "version": {"type": "integer", "minimum": 1},
                    },
                },
                "InvoiceLine": {
                    "type": "object",
                    "required": ["id", "quantity", "unit_price", "amount"],
                    "properties": {
                        "id": {"type": "string"},
                        "position": {"type": "integer"},
                        "description": {"type": "string"},
                        "product_code": {"type": "string"},
                        "quantity": {"type": "string", "description": "decimal string, at least 0"},
                        "unit_price": _MONEY,
                        "amount": _MONEY,
                    },
                },
                "Invoice": {
                    "type": "object",
                    "required": ["id", "number", "customer_id", "status", "currency", "total", "updated_at", "version"],
                    "properties": {
                        "id": {"type": "string"},
                        "number": {"type": "string"},
                        "customer_id": {"type": "string"},
                        "status": {"enum": ["draft", "open", "paid", "void", "uncollectible"]},
                        "currency": {"type": "string", "description": "ISO 4217"},
                        "issued_at": _TIME,
                        "due_at": _TIME,
                        "paid_at": {"type": ["string", "null"], "format": "date-time"},
                        "subtotal": _MONEY,
                        "tax": _MONEY,
                        "total": _MONEY,
                        "amount_paid": _MONEY,
                        "amount_due": _MONEY,
                        "lines": {"type": "array", "items": {"$ref": "#/components/schemas/InvoiceLine"}},
                        "created_at": _TIME,
                        "updated_at": _TIME,
                        "version": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
    }
