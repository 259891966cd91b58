"""Twenty-two JSON schemas for structured-output tests: nested objects, arrays, enums, bounded numbers,
optional fields, unions, patterns; each with a prompt that asks for it."""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("person", "Describe a person named Alice who is 30 years old.", _obj({"name": _STR, "age": _INT})),
    ("city", "Give the name and country of the capital of France.", _obj({"city": _STR, "country": _STR})),
    ("bounded_age", "How old is a typical university student?",
     _obj({"age": {"type": "integer", "minimum": 16, "maximum": 40}})),
    ("temperature", "What is a pleasant temperature in Celsius?",
     _obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("color_enum", "Pick the color of the sky.", _obj({"color": {"enum": ["red", "green", "blue", "yellow"]}})),
    ("sentiment", "Classify the sentiment of: 'I love this phone!'",
     _obj({"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
           "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("tags", "List three tags for a blog post about cooking pasta.",
     _obj({"tags": {"type": "array", "items": _STR, "minItems": 3, "maxItems": 3}})),
    ("numbers", "List the first five prime numbers.",
     _obj({"primes": {"type": "array", "items": {"type": "integer", "minimum": 2}, "minItems": 1, "maxItems": 8}})),
    ("optional_fields", "Describe a book you like.",
     _obj({"title": _STR, "author": _STR, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
          required=["title"])),
    ("nested_address", "Give an address for a bakery in Paris.",
     _obj({"name": _STR,
           "address": _obj({"street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("order", "Write an order for two coffees and a croissant.",
     _obj({"items": {"type": "array", "minItems": 1, "maxItems": 4,
                     "items": _obj({"product": _STR, "quantity": {"type": "integer", "minimum": 1, "maximum": 9}})},
           "paid": {"type": "boolean"}})),
    ("boolean", "Is water wet? Answer as JSON.", _obj({"answer": {"type": "boolean"}, "reason": _STR})),
    ("nullable", "Who is the king of France today?", _obj({"king": {"type": ["string", "null"]}})),
    ("union", "Give an identifier for user number seven.",
     _obj({"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 12}]}})),
    ("event", "Describe a meeting tomorrow at 10 with two attendees.",
     _obj({"title": {"type": "string", "maxLength": 40}, "hour": {"type": "integer", "minimum": 0, "maximum": 23},
           "attendees": {"type": "array", "items": _obj({"name": _STR, "email": _STR}, required=["name"]),
                         "maxItems": 3}})),
    ("matrix", "Write a 2 by 2 identity matrix.",
     _obj({"rows": {"type": "array", "minItems": 2, "maxItems": 2,
                    "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer"}}}})),
    ("recipe", "Give a short recipe for tea.",
     _obj({"name": _STR, "steps": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 4},
           "minutes": {"type": "integer", "minimum": 1, "maximum": 60}})),
    ("const", "Report the status of the system as ok.", _obj({"status": {"const": "ok"}, "code": _INT})),
    ("bounded_string", "Give a nickname for a cat.",
     _obj({"nickname": {"type": "string", "minLength": 2, "maxLength": 10}})),
    ("ref_tree", "Describe a folder with one sub-folder.",
     {"$defs": {"file": _obj({"name": _STR, "bytes": {"type": "integer", "minimum": 0}}),
                "folder": _obj({"name": _STR, "files": {"type": "array", "maxItems": 2,
                                                        "items": {"$ref": "#/$defs/file"}}})},
      **_obj({"root": {"$ref": "#/$defs/folder"}})}),
    ("product", "Describe a laptop for sale.",
     _obj({"name": _STR, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
           "currency": {"enum": ["EUR", "USD"]}, "in_stock": {"type": "boolean"},
           "specs": _obj({"ram_gb": {"type": "integer", "minimum": 1, "maximum": 256}, "cpu": _STR}, required=["ram_gb"])},
          required=["name", "price", "currency"])),
    ("top_level_array_in_object", "List two planets and their order from the sun.",
     _obj({"planets": {"type": "array", "maxItems": 3,
                       "items": _obj({"planet": _STR, "order": {"type": "integer", "minimum": 1, "maximum": 8}})}})),
]
