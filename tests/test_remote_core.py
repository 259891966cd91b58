"""The core as a remote service: real processes, an on-path recorder, several replicas, a real Redis locker.

edge -> RecordingForwarder (the ingress, the network) -> core replica(s), each replica with the
same identity key and enrolled edges, all sharing one Redis locker.
"""

from __future__ import annotations

import asyncio
import re
import signal
import struct
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
import torch

from cloaking.secretbox import KeySource
from edge_proxy.chat_template import render_prompt
from edge_proxy.core_client import HttpCoreTransport
from edge_proxy.edge_model import EdgeModel
from edge_proxy.outgoing import NoiseSpec, OutgoingStates
from tests.forwarder import RecordingForwarder
from veil import wire
from veil.identity import CorePin, load_private_key
from veil.wire import StepRequest
from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port, ready_all

pytestmark = pytest.mark.slow
LOCKER_URL = "redis://127.0.0.1:6379/7"  # a database of its own: the tests flush it
MODEL = "tiny-llama"
PLANTED = "My locker combination is PLANTED-4242-XYZZY and my name is Quentin Marlowe."


class Cluster:
    """Core replicas behind one recording forwarder, and an edge that knows only the forwarder."""

    def __init__(self, tmp: Path, edge_bundle: Path, core_bundle: Path, key_file: Path, replicas: int,
                 core_env: dict[str, str] | None = None):
        self.tmp = tmp
        self.wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 16)
        self.core_env = {"VEIL_CORE_BUNDLE": str(core_bundle), "VEIL_LOCKER_REDIS_URL": LOCKER_URL,
                         "VEIL_CORE_MAX_TOKENS_PER_SESSION": "512", **self.wiring, **(core_env or {})}
        self.ports = [free_port() for _ in range(replicas)]
        self.metrics_ports = [free_port() for _ in range(replicas)]
        self.cores: list[Server | None] = [None] * replicas
        self.edge: Server | None = None
        self.forwarder = RecordingForwarder(self.ports)
        try:
            for i in range(replicas):
                self.start(i, wait=False)
            edge_port = free_port()
            self.edge = Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(edge_port), VEIL_EDGE_CORE_URL=self.forwarder.url,
                                                VEIL_BUNDLE_EDGE_DIR=str(edge_bundle), VEIL_BUNDLE_KEY_FILE=str(key_file),
                                                VEIL_MODEL_NAME=MODEL, **self.wiring),
                               edge_port, tmp / "edge.log")
            ready_all(*self.cores, self.edge)  # type: ignore[arg-type]
        except Exception:
            self.stop()
            raise
        self.client = openai.OpenAI(base_url=self.edge.url + "/v1", api_key="unused", max_retries=0)

    def start(self, i: int, wait: bool = True) -> None:
        env = base_env(self.tmp, VEIL_CORE_PORT=str(self.ports[i]), VEIL_CORE_METRICS_PORT=str(self.metrics_ports[i]),
                       **self.core_env)
        self.cores[i] = Server("core", env, self.ports[i], self.tmp / f"core-{i}-{time.monotonic_ns()}.log")
        if wait:
            self.cores[i].wait_ready()

    def metric(self, i: int, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_ports[i]}/metrics").text
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def holder(self) -> int:
        """The replica that holds the (one) live session."""
        held = [i for i, c in enumerate(self.cores) if c and self.metric(i, "veil_core_active_sessions") > 0]
        assert len(held) == 1, f"expected one replica holding the session, got {held}"
        return held[0]

    def kill(self, i: int, sig: int) -> None:
        core = self.cores[i]
        assert core is not None
        core.proc.send_signal(sig)
        core.proc.wait(timeout=30)
        core.stop()
        self.cores[i] = None

    def edge_metric(self, name: str) -> float:
        assert self.edge is not None
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", httpx.get(self.edge.url + "/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    def transport(self) -> HttpCoreTransport:
        return HttpCoreTransport(self.forwarder.url, 30, identity=load_private_key(self.tmp / "edge.key"),
                                 pin=CorePin.parse(self.wiring["VEIL_EDGE_CORE_PUBLIC_KEY"]))

    def stop(self) -> None:
        for s in [self.edge, *self.cores]:
            if s is not None:
                s.stop()
        self.forwarder.stop()


@pytest.fixture()
def locker() -> redis.Redis:
    client = redis.Redis.from_url(LOCKER_URL)
    client.ping()  # no Redis is a failure, never a skip
    client.flushdb()
    yield client
    client.flushdb()


def _eos_bias(model: EdgeModel) -> dict[str, int]:
    return {str(e): -100 for e in model.eos_ids}  # every reply runs to max_tokens, so a kill lands mid-stream


def _http_bodies(stream: bytes) -> list[bytes]:
    """The bodies of the HTTP/1.1 messages in one direction of the recording (Content-Length framed)."""
    bodies, at = [], 0
    while (end := stream.find(b"\r\n\r\n", at)) != -1:
        head = stream[at:end].lower()
        length = re.search(rb"content-length: *(\d+)", head)
        n = int(length.group(1)) if length else 0
        bodies.append(stream[end + 4 : end + 4 + n])
        at = end + 4 + n
    return bodies


def test_an_on_path_observer_and_redis_see_only_ciphertext(tiny_bundles, key_file: Path, tmp_path: Path,
                                                           locker: redis.Redis) -> None:
    ckpt, edge_dir, core_dir = tiny_bundles["llama"]
    cluster = Cluster(tmp_path, edge_dir, core_dir, key_file, replicas=1,
                      core_env={"VEIL_CORE_LOCKER_AFTER_SECONDS": "0.5"})
    try:
        model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
        messages = [{"role": "user", "content": PLANTED}]
        reply = cluster.client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                       max_tokens=24, logit_bias=_eos_bias(model))
        reply_text = reply.choices[0].message.content
        assert reply_text and reply.usage.completion_tokens == 24

        # a session that goes to the locker and comes back, driven at the transport to see its keys
        ids = render_prompt(ckpt.tokenizer, messages)
        rows = OutgoingStates(model, NoiseSpec())(ids, 0)  # the exact rotated rows of the planted prompt
        transport = cluster.transport()

        async def lockered() -> tuple[torch.Tensor, torch.Tensor, bytes]:
            await transport.info()
            req = StepRequest("feed" * 8, 0, rows, request_id="r", bundle_id=model.spec.bundle_id)
            first = await transport.step(req)
            locker_key = transport._links[req.session].locker_key
            deadline = time.monotonic() + 20
            while not locker.keys("veil:locker:*") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)  # idle past locker_after_seconds: the sweep seals it into Redis
            assert locker.keys("veil:locker:*"), "the idle session went to the locker"
            snapshot_values.extend(locker.get(key) or b"" for key in locker.keys("veil:locker:*"))
            nxt = StepRequest("feed" * 8, len(ids), rows[:1], request_id="r", bundle_id=model.spec.bundle_id)
            second = await transport.step(nxt)
            await transport.aclose()
            return first.hidden, second.hidden, locker_key

        snapshot_values: list[bytes] = []
        returned, resumed, locker_key = asyncio.run(lockered())
        assert cluster.metric(0, 'veil_core_locker_reads_total{result="hit"}') == 1
        assert cluster.metric(0, 'veil_core_locker_writes_total{result="stored"}') >= 1
        assert snapshot_values and all(len(v) > rows.numel() for v in snapshot_values)

        recorded = cluster.forwarder.recorded()
        assert len(recorded) > rows.numel() * 4, "the recorder saw the traffic"
        secrets_ = {
            "prompt text": PLANTED.encode(), "a planted word": b"PLANTED-4242", "a planted name": b"Marlowe",
            "reply text": reply_text.encode(), "locker key": locker_key,
            "edge private key": load_private_key(tmp_path / "edge.key").private_bytes_raw(),
            "core private key": load_private_key(tmp_path / "core.key").private_bytes_raw(),
            "prompt token ids (int32)": struct.pack(f"<{len(ids)}i", *ids),
            "prompt token ids (msgpack)": __import__("msgpack").packb(ids),
        }
        for i in range(rows.shape[0]):
            secrets_[f"rotated input row {i}"] = rows[i].numpy().tobytes()
        for name, t in (("returned hidden state", returned), ("resumed hidden state", resumed)):
            for i in range(t.shape[0]):
                secrets_[f"{name} {i}"] = t[i].numpy().tobytes()
        everything = [locker.get(k) or b"" for k in locker.keys("*")]  # what else Redis holds (hello digests)
        stores = {"the recorded bytes": recorded, **{f"redis value {i}": v for i, v in enumerate(snapshot_values)},
                  **{f"other redis value {i}": v for i, v in enumerate(everything)},
                  "redis key names": b" ".join(locker.keys("*"))}
        for where, blob in stores.items():
            for what, needle in secrets_.items():
                assert needle not in blob, f"{what} appears in {where}"

        # the wire observer's attack on whatever it can parse: nothing parses as a frame, norms read nothing
        bodies = _http_bodies(bytes(cluster.forwarder.upstream)) + _http_bodies(bytes(cluster.forwarder.downstream))
        step_bodies = [b for b in bodies if len(b) > 256]
        assert step_bodies, "the recorder saw step bodies"
        for body in step_bodies:
            for decode in (wire.decode_request, wire.decode_result):
                with pytest.raises(Exception):
                    decode(body)
        d = model.spec.hidden_size
        vectors = torch.cat([torch.frombuffer(bytearray(b[: len(b) // (4 * d) * 4 * d]), dtype=torch.float32)
                             .view(-1, d) for b in step_bodies if len(b) >= 4 * d])
        guess = _norm_guess(ckpt, vectors)
        hits = len(set(guess) & set(ids))
        assert hits <= max(2, len(set(ids)) // 10), f"norms of ciphertext matched {hits} prompt tokens"
    finally:
        cluster.stop()


def _norm_guess(ckpt, vectors: torch.Tensor) -> list[int]:
    """Attack F on arbitrary vectors: each one's norm matched to the nearest public embedding norm."""
    table = ckpt.model.get_input_embeddings().weight.detach().double().norm(dim=-1)
    order = torch.argsort(table)
    sorted_norms = table[order]
    seen = vectors.double().nan_to_num(0, 0, 0).norm(dim=-1)
    right = torch.searchsorted(sorted_norms, seen).clamp(max=len(table) - 1)
    return order[right].tolist()


def _conversation(cluster: Cluster, model: EdgeModel, turns: list[str], during=None, before=None) -> list[str]:
    """A greedy multi-turn chat, streamed; `before(turn)` and `during(turn, chunks_seen)` may kill replicas."""
    messages: list[dict[str, str]] = []
    replies = []
    for turn, text in enumerate(turns):
        if before is not None:
            before(turn)
        messages.append({"role": "user", "content": text})
        parts, seen = [], 0
        stream = cluster.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48,
                                                        logit_bias=_eos_bias(model), stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                seen += 1
                if during is not None:
                    during(turn, seen)
        replies.append("".join(parts))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


TURNS = ["Hello there.", "Tell me about lighthouses.", "And storms?", "Why is the sea salty?", "Thanks, goodbye."]


def test_replicas_lose_no_conversation(tiny_bundles, key_file: Path, tmp_path: Path, locker: redis.Redis) -> None:
    _, edge_dir, core_dir = tiny_bundles["llama"]
    cluster = Cluster(tmp_path, edge_dir, core_dir, key_file, replicas=2)
    try:
        model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
        reference = _conversation(cluster, model, TURNS)
        assert len(set(cluster.forwarder.connections)) == 2, "round robin used both replicas"

        events: list[str] = []

        def chaos(turn: int, seen: int) -> None:
            if seen != 8:
                return
            holder = cluster.holder()
            if turn == 1:  # a rolling update: SIGTERM drains the session into the locker
                cluster.kill(holder, signal.SIGTERM)
                events.append("drained")
            elif turn == 3:  # a lost pod, and nothing in the locker: the edge re-prefills
                cluster.kill(holder, signal.SIGKILL)
                locker.flushdb()
                events.append("killed")
            else:
                return
            cluster.start(holder)  # the replacement pod comes up empty

        hits: list[float] = []

        def between(turn: int) -> None:
            if turn == 2:  # the replica that served the last turn goes away between turns
                hits.append(sum(cluster.metric(i, 'veil_core_locker_reads_total{result="hit"}') for i in range(2)))
                i = cluster.ports.index(cluster.forwarder.connections[-1])
                cluster.kill(i, signal.SIGTERM)
                cluster.start(i)
                events.append("replaced")

        survivors = _conversation(cluster, model, TURNS, during=chaos, before=between)
        assert events == ["drained", "replaced", "killed"]
        assert survivors == reference, "the conversation is the same as an uninterrupted run"
        assert hits[0] >= 1, "the drained session was taken from the locker"
        assert cluster.edge_metric("veil_edge_core_resumes_total") >= 2
        assert cluster.edge_metric("veil_edge_reprefills_total") >= 1, "the flushed locker cost one re-prefill"
    finally:
        cluster.stop()
