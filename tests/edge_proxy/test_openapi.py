"""The OpenAPI document: the chat request with its bounds, 200 (not 201) for POSTs that create nothing, and
OpenAI-shaped error bodies for the statuses each route can answer."""

from __future__ import annotations

from litestar import Litestar

from admin.api import admin_router, me_route
from edge_proxy import app as edge_app
from edge_proxy.schemas import MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_STOPS


def _doc() -> dict:
    app = Litestar(route_handlers=[edge_app.list_models, edge_app.get_model, edge_app.chat_completions,
                                   edge_app.healthz, edge_app.readyz, edge_app.metrics, admin_router, me_route])
    return app.openapi_schema.to_schema()


def test_the_chat_route_documents_its_request_and_responses() -> None:
    op = _doc()["paths"]["/v1/chat/completions"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["model", "messages"]
    props = schema["properties"]
    assert props["messages"]["maxItems"] == MAX_MESSAGES and props["logit_bias"]["maxProperties"] == MAX_LOGIT_BIAS
    assert props["stop"]["anyOf"][1]["maxItems"] == MAX_STOPS
    assert (props["temperature"]["minimum"], props["temperature"]["maximum"]) == (0, 2)
    assert set(op["responses"]) == {"200", "400", "401", "403", "404", "413", "429", "502", "503", "504"}
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["properties"]["object"] == {"const": "chat.completion"}
    assert "text/event-stream" in ok
    assert op["responses"]["429"]["content"]["application/json"]["schema"]["required"] == ["error"]


def test_every_route_documents_openai_error_bodies_not_litestars() -> None:
    for path, item in _doc()["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    body = response["content"]["application/json"]["schema"]
                    assert body.get("required") == ["error"], (method, path, status)
            if path != "/healthz" and path != "/readyz":
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    posts = _doc()["paths"]
    assert "200" in posts["/admin/v1/keys/{key_id}/revoke"]["post"]["responses"]
    assert "201" in posts["/admin/v1/keys"]["post"]["responses"]  # this one creates a key
