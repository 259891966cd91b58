"""Every VeilError subclass renders as OpenAI error JSON, through the one handler both servers use."""

from __future__ import annotations

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from veil import errors
from veil.http import EXCEPTION_HANDLERS


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


# the tree of veil.errors (a package may refine one for its own handler, e.g. the console's SignInRequired)
VEIL_ERRORS = [errors.VeilError, *(c for c in _all_subclasses(errors.VeilError) if c.__module__ == errors.__name__)]
STATUSES = {400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504}


def _instance(cls: type[errors.VeilError]) -> errors.VeilError:
    if cls is errors.PolicyViolation:
        return cls("rule-7")
    if cls is errors.BundleMismatch:
        return cls()
    return cls("the server's own words")


def test_every_error_class_of_the_module_is_covered() -> None:
    defined = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.VeilError)}
    assert defined == set(VEIL_ERRORS)


@pytest.mark.parametrize("cls", VEIL_ERRORS, ids=lambda c: c.__name__)
def test_each_error_renders_through_the_handler(cls: type[errors.VeilError]) -> None:
    exc = _instance(cls)

    @get("/boom")
    async def boom() -> None:
        raise exc

    with TestClient(Litestar([boom], exception_handlers=EXCEPTION_HANDLERS)) as client:
        response = client.get("/boom")
    assert response.status_code == cls.status_code in STATUSES
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == exc.message and body["error"]["code"] == exc.code
    assert body["error"]["type"] == cls.error_type
    for name, value in exc.headers.items():
        assert response.headers[name] == value
    if cls.status_code >= 500:
        assert body["error"]["type"] == "server_error"


def test_core_errors_are_gateway_statuses() -> None:
    assert all(c.status_code in (502, 503, 504) for c in [errors.CoreError, *_all_subclasses(errors.CoreError)])
    assert errors.CoreBusy("busy").headers == {"retry-after": "1"}
