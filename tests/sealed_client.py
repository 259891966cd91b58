"""A raw client of the core's sealed API, for tests that look at (and tamper with) single frames."""

from __future__ import annotations

import secrets

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from veil import wire
from veil.channel import Channel, CoreKeys, EdgeHello
from veil.identity import parse_public_key, unb64
from veil.wire import StepRequest, StepResult

# A step can run a long prefill on a slow 2-core CI machine (1,024 rows through vLLM on CPU took over httpx's
# default 5 s there); the tests check what comes back, not how fast.
STEP_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def core_keys(url: str) -> tuple[CoreKeys, dict]:
    info = httpx.get(url + "/v1/info").json()
    ident = info["identity"]
    pq = mlkem.MLKEM768PublicKey.from_public_bytes(unb64(ident["mlkem768_public_key"]))
    return CoreKeys(parse_public_key(ident["public_key"]), pq), info


class SealedSession:
    """One session opened with a real handshake; `frame` seals, `post` sends whatever bytes it is given."""

    def __init__(self, url: str, edge: x25519.X25519PrivateKey, *, sid: str | None = None, resume: bool = False,
                 post_quantum: bool = False, bundle_id: str | None = None):
        self.url = url
        keys, info = core_keys(url)
        self.bundle_id = bundle_id or info["bundle_id"]
        self.sid = sid or secrets.token_hex(16)
        hello = EdgeHello(edge, keys, self.sid, self.bundle_id, resume=resume, post_quantum=post_quantum)
        self.hello_body = hello.body
        self.opened = httpx.post(url + "/v1/sessions", content=hello.body, timeout=STEP_TIMEOUT)
        self.channel: Channel | None = hello.finish(self.opened.content) if self.opened.status_code == 200 else None

    def frame(self, offset: int, hidden: torch.Tensor, **kw) -> tuple[int, bytes]:
        """(seq, sealed step frame)."""
        assert self.channel is not None
        kw.setdefault("bundle_id", self.bundle_id)
        body = self.channel.seal("step", wire.encode_request(StepRequest(self.sid, offset, hidden, **kw)))
        return self.channel.sent - 1, body

    def post(self, body: bytes, sid: str | None = None) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/sessions/{sid or self.sid}/step", content=body,
                          headers={"content-type": wire.CONTENT_TYPE}, timeout=STEP_TIMEOUT)

    def result(self, response: httpx.Response, seq: int) -> StepResult:
        assert response.status_code == 200, response.text
        assert self.channel is not None
        return wire.decode_result(self.channel.open("step", response.content, seq=seq))

    def step(self, offset: int, hidden: torch.Tensor, **kw) -> StepResult:
        seq, body = self.frame(offset, hidden, **kw)
        return self.result(self.post(body), seq)

    def close(self) -> httpx.Response:
        assert self.channel is not None
        return httpx.request("DELETE", f"{self.url}/v1/sessions/{self.sid}", content=self.channel.seal("close", b""))
