"""Soak: many concurrent streaming clients against a real core + edge on loopback, for minutes.

A `veil core` and an auth-enabled `veil edge` run as child processes (the machinery `veil up`
uses, veil_cli.processes). Clients are the official `openai` package (AsyncOpenAI, stream=True)
with API keys made through the admin REST API: one unlimited key for most clients, one key
with a small requests-per-minute limit for a few clients (their 429s are intended and counted
apart), and one `metrics`-scope key for the scraper. Prompts mix lengths (a few words to a few
hundred tokens), max_tokens runs 1..128, and a share of the streams is closed after a few chunks.

It checks, and fails (exit 1) on any of:
  - an error: any exception or non-200 other than the limited key's `rate_limit_exceeded` 429s
    (reported by class and status only, never by content);
  - resident memory growth of edge or core: the least-squares slope of VmRSS over the second
    half of the load phase above --max-slope MiB/min (default 2). For the core, VmRSS less the
    resident part of its KV pool: the pool is planned at start (`veil_core_kv_pool_bytes`) and on a
    CPU committed as sessions first write their slots, so it grows up to its planned size by design;
    it is reported apart. Why 2: the system serves about
    40-50 requests a minute here, so 2 MiB/min is ~45 KiB a request; any per-request leak worth the
    name is larger (a core KV cache is >= 11.8 MiB, a prompt's hidden states ~2.3 KiB a token, the
    edge's per-request objects tens of KiB), while allocator noise over 5 minutes of 2-second samples
    should move a slope fitted to 150 samples over 5 minutes far less than that once the first half
    has warmed the caches up;
  - a core session left once the clients have stopped (`veil_core_active_sessions` on the core's
    /metrics, given a few seconds for disconnect clean-up), or an edge /metrics the scraper key
    cannot read;
  - a planted canary word or an API key secret found in the edge's, the core's or the audit log.

    python bench/soak.py --duration 600 --clients 64 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import secrets
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

from veil_cli.enroll import enroll_locally  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

MODEL_NAME = "smollm2-135m-instruct"
CANARY_PREFIX = "Zqwuk"  # every planted canary word starts with this; no log line may contain it
ACTIVE_SESSIONS = "veil_core_active_sessions"

WORDS = (
    "the harbor morning light river stone garden window letter market station bridge winter summer autumn "
    "spring forest mountain valley village city road train engine paper table chair kitchen bread coffee "
    "tea water fire wind cloud rain snow storm ocean island ship sailor captain map compass journey story "
    "teacher student lesson library book page chapter music song piano violin painter color blue green red "
    "yellow orange purple silver golden quiet loud slow quick bright dark warm cold gentle careful simple "
    "strange ancient modern small large heavy light early late always never often sometimes because although "
    "while after before during under over between across through around near far inside outside people "
    "friend family neighbor doctor farmer baker builder engineer manager report budget meeting project plan "
    "schedule customer order invoice delivery warehouse package number figure chart question answer reason"
).split()
TASKS = [
    "Summarize the notes above in one sentence.",
    "Write a short poem inspired by the notes.",
    "What is the code word? Repeat it.",
    "List three things mentioned in the notes.",
    "Explain the notes to a child.",
    "Continue the story.",
    "Translate the first sentence into French.",
    "Give the notes a title.",
]


@dataclasses.dataclass
class SoakConfig:
    duration: float = 600.0  # seconds during which clients start new requests
    clients: int = 64
    limited_clients: int = 0  # clients on the rate-limited key; 0 = max(1, clients // 16)
    limited_rpm: int = 2  # requests per minute of the limited key (its clients ask for short replies)
    disconnect_rate: float = 0.05  # share of streams closed after a few chunks
    max_prompt_words: int = 300  # prompts run from a few words to this many (about 1.3 tokens each)
    sample_every: float = 2.0  # seconds between RSS / gauge samples
    max_slope: float = 2.0  # MiB/minute of RSS growth allowed over the second half of the load phase
    max_slope_core: float | None = None  # the core's own bound; None = max_slope
    drain_timeout: float = 420.0  # how long in-flight streams may take to finish after the load phase
    settle_timeout: float = 15.0  # how long the core may take to free the last sessions
    request_timeout: float = 300.0  # openai client timeout (also between chunks)
    seed: int = 1234
    ramp: float = -1.0  # clients start spread over this many seconds; -1 = min(60, duration / 6)
    # server sizing: every client may hold one core session, with room for sessions still closing
    core_max_sessions: int = 0  # 0 = clients + 16 (also the edge's quota at the core)
    core_max_tokens_per_session: int = 1024  # longest prompt + 128 new tokens fit with room to spare
    core_max_batch_tokens: int = 512  # keeps one CPU forward (so every step's wait) to seconds, far below the
    # edge's 60 s core timeout even when other work shares the 2 cores; a longer prompt still runs alone
    # torch threads: 1 each. With the default (one per core) every OpenMP region of a process waits for a
    # thread the other busy process has descheduled: on 2 shared cores a 64-row decode step measured
    # 6 s at 2 threads and 0.3 s at 1 while another process was busy (OMP_WAIT_POLICY=PASSIVE: 0.47 s)
    core_threads: int = 1
    edge_threads: int = 1
    key_session_share: float = 0.5  # the edge's default: it binds only while another key waits for a session
    core_env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra environment (diagnosis: MALLOC_*)
    edge_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ramp < 0:
            self.ramp = min(60.0, self.duration / 6)
        if self.limited_clients <= 0:
            self.limited_clients = max(1, self.clients // 16)
        if self.core_max_sessions <= 0:
            self.core_max_sessions = self.clients + 16
        if not 0 < self.limited_clients < self.clients:
            raise ValueError("need at least one client on the unlimited key and one on the limited key")


@dataclasses.dataclass
class Stats:
    started: int = 0
    completed: int = 0  # streams read to the end (finish_reason and usage seen)
    disconnects: int = 0  # streams closed by the client before the end
    planned_disconnects_finished_first: int = 0  # the reply ended before the planned disconnect point
    intended_429: int = 0
    limited_admitted: int = 0  # streams of the rate-limited key that got through (its limit admits some)
    tokens_streamed: int = 0  # usage.completion_tokens of completed streams + content chunks of closed ones
    prompt_tokens: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # "Class status code" -> count
    ttft: list[float] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)
        code = body.get("code") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = body["error"].get("code")
        # class, status and the server's short error code only: never a message or any content
        safe = code if isinstance(code, str) and re.fullmatch(r"[a-z0-9_]{1,48}", code) else "-"
        cause = exc.__cause__ or exc.__context__  # e.g. httpx.RemoteProtocolError under APIConnectionError
        key = f"{type(exc).__name__} status={status if status is not None else '-'} code={safe}" + \
            (f" cause={type(cause).__name__}" if cause is not None else "")
        self.errors[key] = self.errors.get(key, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# ---------------------------------------------------------------- prompts


def make_canary(rng: random.Random) -> str:
    return CANARY_PREFIX + "".join(rng.choice(string.ascii_lowercase) for _ in range(7))


def make_messages(rng: random.Random, max_words: int, canaries: set[str]) -> list[dict[str, str]]:
    """A user prompt of a log-uniform number of words with one planted canary word (sometimes a system turn)."""
    n = int(math.exp(rng.uniform(math.log(3), math.log(max_words))))
    canary = make_canary(rng)
    canaries.add(canary)
    words = [rng.choice(WORDS) for _ in range(n)]
    words.insert(rng.randrange(len(words) + 1), f"(the code word is {canary})")
    text = "Notes: " + " ".join(words) + ".\n" + rng.choice(TASKS)
    messages = [{"role": "user", "content": text}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a concise and helpful assistant."})
    return messages


# ---------------------------------------------------------------- process sampling


def proc_sample(pid: int, pool_bytes: int = 0) -> dict[str, float] | None:
    """VmRSS (MiB), threads and open file descriptors of one process, from /proc; with `pool_bytes`, also
    the resident MiB of the KV pool (its two tensors) and VmRSS without them."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        pool_kib = pool_resident_kib(Path(f"/proc/{pid}/smaps").read_text(), pool_bytes) if pool_bytes else 0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    out = {"rss_mib": rss_mib, "threads": int(fields["Threads"]), "fds": fds}
    if pool_bytes:
        out |= {"pool_rss_mib": pool_kib / 1024, "rss_outside_pool_mib": rss_mib - pool_kib / 1024}
    return out


def pool_resident_kib(smaps: str, pool_bytes: int) -> int:
    """Resident KiB of the anonymous mappings that hold the KV pool's two tensors (k and v, each half of
    `pool_bytes`). Each is far above malloc's mmap threshold, so it is mapped on its own, but the kernel merges
    adjacent anonymous mappings: any anonymous mapping at least one tensor's size is counted, whole."""
    tensor_kib = pool_bytes // 2 // 1024
    total, anonymous, size = 0, False, 0
    for line in smaps.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            anonymous, size = len(line.split()) == 5, 0
        elif line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and anonymous and size >= tensor_kib:
            total += int(line.split()[1])
    return total


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) in MiB/minute; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (y - my) for t, y in points) / var


def parse_metric(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {labels string: value} for one metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
            if m:
                out[m.group(1) or ""] = float(m.group(2))
    return out


# ---------------------------------------------------------------- the run


class Soak:
    def __init__(self, cfg: SoakConfig, pair: VeilPair, keys: dict[str, str]):
        self.cfg, self.pair, self.keys = cfg, pair, keys
        self.stats = Stats()
        self.canaries: set[str] = set()
        self.samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.load_end = 0.0
        self.stopping = False
        self.pool_bytes = 0  # the core's planned KV pool, from its /metrics

    def _client(self, key: str) -> openai.AsyncOpenAI:
        limits = httpx.Limits(max_connections=self.cfg.clients * 2, max_keepalive_connections=self.cfg.clients)
        http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.cfg.request_timeout, connect=10))
        return openai.AsyncOpenAI(base_url=self.pair.base_url, api_key=key, max_retries=0, http_client=http)

    async def one_request(self, client: openai.AsyncOpenAI, rng: random.Random, limited: bool) -> None:
        cfg, st = self.cfg, self.stats
        disconnect = rng.random() < cfg.disconnect_rate
        if limited:
            max_tokens = rng.randint(1, 16)  # a batch job's short answers: its limit, not its replies, binds
        elif disconnect:
            max_tokens = rng.randint(32, 128)  # long enough that the close lands mid-stream
        else:
            max_tokens = rng.randint(1, 128)
        close_after = rng.randint(1, 5) if disconnect else None
        messages = make_messages(rng, cfg.max_prompt_words, self.canaries)
        st.started += 1
        started = time.monotonic()
        content_chunks, finished, usage = 0, False, None
        try:
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, temperature=round(rng.uniform(0, 1.2), 2),
                seed=rng.randrange(1 << 30))
            closed = False
            st.limited_admitted += limited
            async for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        if content_chunks == 0:
                            st.ttft.append(time.monotonic() - started)
                        content_chunks += 1
                    if choice.finish_reason:
                        finished = True
                if chunk.usage is not None:
                    usage = chunk.usage
                if close_after is not None and content_chunks >= close_after and not finished:
                    await stream.close()  # the client goes away mid-stream
                    closed = True
                    break
            if closed:
                st.disconnects += 1
                st.tokens_streamed += content_chunks
            elif finished and usage is not None:
                st.completed += 1
                st.tokens_streamed += usage.completion_tokens
                st.prompt_tokens += usage.prompt_tokens
                st.latency.append(time.monotonic() - started)
                if close_after is not None:
                    st.planned_disconnects_finished_first += 1
            else:
                st.error(IncompleteStream())
        except openai.RateLimitError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            if limited and body.get("code") == "rate_limit_exceeded":
                st.intended_429 += 1
                try:
                    wait = float(exc.response.headers.get("retry-after", "1"))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(max(wait, 0.5), 5.0))
            else:
                st.error(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure is an error, counted by class
            st.error(exc)
            await asyncio.sleep(0.5)

    async def client_loop(self, i: int, client: openai.AsyncOpenAI, limited: bool) -> None:
        rng = random.Random(self.cfg.seed * 10007 + i)
        # a ramp, not 64 prefills at once: the first burst would queue minutes of prefill on a CPU core
        await asyncio.sleep(self.cfg.ramp * i / self.cfg.clients)
        while time.monotonic() < self.load_end:
            await self.one_request(client, rng, limited)

    async def sampler(self) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not self.stopping:
                await self.sample(http)
                await asyncio.sleep(self.cfg.sample_every)

    async def sample(self, http: httpx.AsyncClient) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "phase": self.phase(),
                               "loadavg_1m": round(os.getloadavg()[0], 2)}  # others' work on the same cores
        assert self.pair.edge is not None
        try:
            text = (await http.get(self.pair.metrics_url + "/metrics")).text
            self.pool_bytes = int(parse_metric(text, "veil_core_kv_pool_bytes").get("") or 0)
            row["core_active_sessions"] = parse_metric(text, ACTIVE_SESSIONS).get("")
            row["core_queued_steps"] = parse_metric(text, "veil_core_queued_steps").get("")
        except httpx.HTTPError as exc:
            row["core_metrics_error"] = type(exc).__name__
        row["edge"] = proc_sample(self.pair.edge.proc.pid)
        row["core"] = proc_sample(self.pair.core.proc.pid, self.pool_bytes)
        self.samples.append(row)
        return row

    def phase(self) -> str:
        now = time.monotonic()
        return "load" if now < self.load_end else "drain"

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        main, limited = self._client(self.keys["main"]), self._client(self.keys["limited"])
        self.t0 = time.monotonic()
        self.load_end = self.t0 + cfg.duration
        sampler = asyncio.create_task(self.sampler())
        tasks = [asyncio.create_task(self.client_loop(i, limited if i < cfg.limited_clients else main,
                                                      i < cfg.limited_clients)) for i in range(cfg.clients)]
        await asyncio.sleep(cfg.duration)
        print(f"load phase over after {cfg.duration:.0f}s: {self.stats.started} requests started; "
              f"draining in-flight streams", flush=True)
        done, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout)
        for task in pending:
            task.cancel()
            self.stats.error(DrainTimeout())
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.stats.error(task.exception())  # type: ignore[arg-type]
        drain_s = time.monotonic() - self.load_end
        await main.close()
        await limited.close()
        # the clients are gone: the core must free every session within a few seconds
        settle = await self.settle()
        self.stopping = True
        await sampler
        async with httpx.AsyncClient(timeout=10) as http:
            final = await self.sample(http)
            edge_metrics = await self.edge_metrics(http)
        wall = time.monotonic() - self.t0
        return self.report(wall, drain_s, settle, final, edge_metrics)

    async def settle(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.cfg.settle_timeout
        started = time.monotonic()
        value: float | None = None
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                try:
                    value = parse_metric((await http.get(self.pair.metrics_url + "/metrics")).text,
                                         ACTIVE_SESSIONS).get("")
                except httpx.HTTPError:
                    value = None
                if value == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        return {"core_active_sessions": value, "seconds_to_zero": round(time.monotonic() - started, 2)
                if value == 0 else None}

    async def edge_metrics(self, http: httpx.AsyncClient) -> dict[str, Any]:
        assert self.pair.edge is not None
        url = self.pair.edge.url + "/metrics"
        anonymous = (await http.get(url)).status_code
        r = await http.get(url, headers={"authorization": f"Bearer {self.keys['scraper']}"})
        out: dict[str, Any] = {"status_with_metrics_key": r.status_code, "status_without_key": anonymous}
        if r.status_code == 200:
            out["requests_total"] = {k: v for k, v in parse_metric(r.text, "veil_edge_requests_total").items()}
            out["rate_limited_total"] = parse_metric(r.text, "veil_edge_rate_limited_total")
            out["completion_tokens_total"] = parse_metric(r.text, "veil_edge_completion_tokens_total").get("")
            out["reprefills_total"] = parse_metric(r.text, "veil_edge_reprefills_total").get("")
        return out

    def memory(self, name: str) -> dict[str, Any]:
        rows = [(s["t"], s[name]) for s in self.samples if s.get(name)]
        load = [(t, v) for t, v in rows if t <= self.cfg.duration]
        # the core's KV pool is committed as it is first written, up to its planned size: counted apart
        measured = "rss_outside_pool_mib" if rows and "rss_outside_pool_mib" in rows[-1][1] else "rss_mib"
        half = [(t, v[measured]) for t, v in load if t >= self.cfg.duration / 2 and measured in v]
        slope = slope_per_minute(half)
        pool = {}
        if measured != "rss_mib":
            pool = {"kv_pool_planned_mib": round(self.pool_bytes / 2**20, 1),
                    "kv_pool_resident_end_mib": round(rows[-1][1]["pool_rss_mib"], 1),
                    "kv_pool_resident_max_mib": round(max(v.get("pool_rss_mib", 0) for _, v in rows), 1)}
        return {
            "slope_of": measured, **pool,
            "rss_start_mib": round(rows[0][1]["rss_mib"], 1) if rows else None,
            "rss_end_of_load_mib": round(load[-1][1]["rss_mib"], 1) if load else None,
            "rss_end_mib": round(rows[-1][1]["rss_mib"], 1) if rows else None,
            "rss_max_mib": round(max(v["rss_mib"] for _, v in rows), 1) if rows else None,
            "rss_second_half_min_mib": round(min(v for _, v in half), 1) if half else None,
            "rss_second_half_max_mib": round(max(v for _, v in half), 1) if half else None,
            "slope_mib_per_min": round(slope, 3) if slope is not None else None,
            "slope_samples": len(half),
            "threads_start_end": [rows[0][1]["threads"], rows[-1][1]["threads"]] if rows else None,
            "fds_start_end": [rows[0][1]["fds"], rows[-1][1]["fds"]] if rows else None,
        }

    def report(self, wall: float, drain_s: float, settle: dict[str, Any], final: dict[str, Any],
               edge_metrics: dict[str, Any]) -> dict[str, Any]:
        st, cfg = self.stats, self.cfg

        def pct(xs: list[float], q: float) -> float | None:
            return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

        active = [s["core_active_sessions"] for s in self.samples if s.get("core_active_sessions") is not None]
        queued = [s["core_queued_steps"] for s in self.samples if s.get("core_queued_steps") is not None]
        return {
            "config": dataclasses.asdict(cfg),
            "requests_started": st.started,
            "requests_done": st.completed + st.disconnects,
            "completed": st.completed,
            "disconnects": st.disconnects,
            "planned_disconnects_finished_first": st.planned_disconnects_finished_first,
            "intended_429": st.intended_429,
            "limited_key_admitted": st.limited_admitted,
            "errors": st.error_count,
            "error_kinds": st.errors,
            "tokens_streamed": st.tokens_streamed,
            "prompt_tokens_of_completed": st.prompt_tokens,
            "tokens_per_second": round(st.tokens_streamed / wall, 2) if wall else None,
            "ttft_p50_s": pct(st.ttft, 0.5), "ttft_p95_s": pct(st.ttft, 0.95),
            "latency_p50_s": pct(st.latency, 0.5), "latency_p95_s": pct(st.latency, 0.95),
            "wall_s": round(wall, 1), "load_s": cfg.duration, "drain_s": round(drain_s, 1),
            "core_active_sessions_max": max(active) if active else None,
            "core_queued_steps_max": max(queued) if queued else None,
            "after_clients_stopped": settle,
            "edge_metrics": edge_metrics,
            "memory": {"edge": self.memory("edge"), "core": self.memory("core")},
            "servers_running": {"edge": self.pair.edge is not None and self.pair.edge.running(),
                                "core": self.pair.core.running()},
            "canaries_planted": len(self.canaries),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "load_average_1m_mean": round(sum(s["loadavg_1m"] for s in self.samples) / len(self.samples), 2)
            if self.samples else None,
            "samples": len(self.samples),
        }


class IncompleteStream(Exception):
    """A stream that ended without a finish_reason and usage chunk, and that the client did not close."""


class DrainTimeout(Exception):
    """A client still streaming when the drain timeout ran out."""


# ---------------------------------------------------------------- set-up, log search, verdict


def cloak_bundled(root: Path) -> tuple[Path, Path, Path]:
    """Cloak the bundled SmolLM2 into root/edge and root/core under a fresh key (reused when already there)."""
    from cloaking.checkpoint import bundled_model_path, load_checkpoint
    from cloaking.cloak import cloak
    from cloaking.secretbox import KeySource, create_key_file

    edge, core, key = root / "edge", root / "core", root / "bundle.key"
    if not (edge.is_dir() and core.is_dir() and key.is_file()):
        root.mkdir(parents=True, exist_ok=True)
        if not key.is_file():
            create_key_file(key)
        cloak(load_checkpoint(bundled_model_path()), edge, core, KeySource(key_file=key), MODEL_NAME, progress=False)
    return edge, core, key


def start_pair(cfg: SoakConfig, work: Path, edge_bundle: Path, core_bundle: Path, key_file: Path,
               admin_key: str, passphrase: str) -> VeilPair:
    # the edge's quota at the core: one session per client and room for sessions still closing
    enroll_locally(work / "core.key", work / "edge.key", work / "allowed_edges.yaml", cfg.core_max_sessions)
    core_env = {"VEIL_CORE_MAX_SESSIONS": str(cfg.core_max_sessions),
                "VEIL_CORE_MAX_TOKENS_PER_SESSION": str(cfg.core_max_tokens_per_session),
                "VEIL_CORE_MAX_BATCH_TOKENS": str(cfg.core_max_batch_tokens), "VEIL_CORE_THREADS": str(cfg.core_threads),
                **cfg.core_env}
    edge_env = {"VEIL_EDGE_MAX_SESSIONS": str(cfg.core_max_sessions), "VEIL_EDGE_THREADS": str(cfg.edge_threads),
                "VEIL_EDGE_KEY_SESSION_SHARE": str(cfg.key_session_share),
                "VEIL_AUTH_ENABLED": "true", "VEIL_POLICY_PASSPHRASE": passphrase, "VEIL_ADMIN_KEY": admin_key,
                "VEIL_POLICY_STORE": str(work / "policy.store"), "VEIL_POLICY_AUDIT_LOG": str(work / "audit.log"),
                **cfg.edge_env}
    return VeilPair(work, edge_bundle, core_bundle, key_file, MODEL_NAME, core_env=core_env, edge_env=edge_env)


def make_keys(pair: VeilPair, admin_key: str, limited_rpm: int) -> dict[str, str]:
    """Through the admin REST API: the clients' keys and the scraper's."""
    assert pair.edge is not None
    out = {}
    bodies = {"main": {"name": "soak-main", "scopes": ["generate", "read"]},
              "limited": {"name": "soak-limited", "scopes": ["generate"], "rpm": limited_rpm},
              "scraper": {"name": "soak-scraper", "scopes": ["metrics"]}}
    for role, body in bodies.items():
        r = httpx.post(pair.edge.url + "/admin/v1/keys", json=body,
                       headers={"authorization": f"Bearer {admin_key}"}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"creating the {role} key failed with HTTP {r.status_code}")
        out[role] = r.json()["secret"]
    return out


def search_logs(paths: list[Path], canaries: set[str], secrets_: dict[str, str]) -> dict[str, Any]:
    """Counts of planted canaries and of secrets in the logs (never the matches themselves)."""
    found: dict[str, Any] = {"files": {}, "canary_hits": 0, "canary_prefix_hits": 0, "secret_hits": 0,
                             "secret_hits_by_name": {}}
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        found["files"][path.name] = len(text)
        found["canary_prefix_hits"] += text.count(CANARY_PREFIX)
        found["canary_hits"] += sum(text.count(c) for c in canaries)
        for name, value in secrets_.items():
            n = text.count(value) if value else 0
            if n:
                found["secret_hits_by_name"][name] = found["secret_hits_by_name"].get(name, 0) + n
                found["secret_hits"] += n
    return found


def key_secrets(keys: dict[str, str], admin_key: str, passphrase: str) -> dict[str, str]:
    """What must never be logged: every full key, its secret part (after sk-veil-<id>-), the passphrase."""
    out = {"admin_key": admin_key, "policy_passphrase": passphrase}
    for role, key in keys.items():
        out[f"{role}_key"] = key
        out[f"{role}_key_secret_part"] = key.split("-", 3)[3] if key.count("-") >= 3 else key
    return out


def verdict(report: dict[str, Any]) -> list[str]:
    """The failed checks, in words (empty when the soak passed)."""
    cfg = report["config"]
    fails = []
    if report["errors"]:
        fails.append(f"{report['errors']} errors besides the intended 429s: {report['error_kinds']}")
    if report["completed"] == 0:
        fails.append("no stream completed")
    if report["intended_429"] == 0:
        fails.append("the rate-limited key never got a 429: the limit was not exercised")
    for name, mem in report["memory"].items():
        bound = cfg["max_slope_core"] if name == "core" and cfg["max_slope_core"] is not None else cfg["max_slope"]
        if mem["slope_mib_per_min"] is None:
            fails.append(f"{name}: too few RSS samples for a slope")
        elif mem["slope_mib_per_min"] > bound:
            fails.append(f"{name}: {mem['slope_of']} grows {mem['slope_mib_per_min']:.2f} MiB/min over the second "
                         f"half (bound {bound} MiB/min)")
    after = report["after_clients_stopped"]
    if after["core_active_sessions"] != 0:
        fails.append(f"{ACTIVE_SESSIONS} is {after['core_active_sessions']} after the clients stopped "
                     f"(waited {cfg['settle_timeout']}s)")
    if report["edge_metrics"]["status_with_metrics_key"] != 200:
        fails.append(f"edge /metrics answered {report['edge_metrics']['status_with_metrics_key']} to the metrics key")
    logs = report["logs"]
    if logs["canary_hits"] or logs["canary_prefix_hits"]:
        fails.append(f"canary words in the logs: {logs['canary_hits']} (prefix {logs['canary_prefix_hits']})")
    if logs["secret_hits"]:
        fails.append(f"secrets in the logs: {logs['secret_hits_by_name']}")
    if not all(report["servers_running"].values()):
        fails.append(f"a server exited during the soak: {report['servers_running']}")
    return fails


def source_state() -> dict[str, Any]:
    """The commit and the uncommitted files the servers ran from (a soak of a dirty tree says so)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"head": None, "dirty": None}
    return {"head": head, "dirty": [line[3:] for line in dirty]}


def run_soak(cfg: SoakConfig, work: Path, bundles: tuple[Path, Path, Path] | None = None) -> dict[str, Any]:
    """Start the servers in `work`, soak them, search the logs, stop them; -> the report (with `failures`)."""
    work.mkdir(parents=True, exist_ok=True)
    edge_bundle, core_bundle, key_file = bundles or cloak_bundled(work / "bundles")
    admin_key = "sk-veil-soakadmin-" + secrets.token_urlsafe(32)
    passphrase = "soak passphrase " + secrets.token_urlsafe(16)
    started = time.monotonic()
    pair = start_pair(cfg, work, edge_bundle, core_bundle, key_file, admin_key, passphrase)
    try:
        print(f"core {pair.core.url} (metrics {pair.metrics_url}) and edge {pair.base_url} ready after "
              f"{time.monotonic() - started:.0f}s", flush=True)
        keys = make_keys(pair, admin_key, cfg.limited_rpm)
        soak = Soak(cfg, pair, keys)
        report = asyncio.run(soak.run())
        assert pair.edge is not None
        pair.edge.log(), pair.core.log()  # flush both log files
        logs = [pair.edge.log_path, pair.core.log_path, work / "audit.log"]
        report["logs"] = search_logs([p for p in logs if p is not None], soak.canaries,
                                     key_secrets(keys, admin_key, passphrase))
        report["logs"]["dir"] = str(work)
        report["rss_samples"] = soak.samples
    finally:
        pair.stop()
    report["source"] = source_state()
    report["failures"] = verdict(report)
    report["passed"] = not report["failures"]
    return report


def summary(report: dict[str, Any]) -> str:
    mem, logs, after = report["memory"], report["logs"], report["after_clients_stopped"]
    em = report["edge_metrics"]
    lines = [
        f"soak: {report['config']['clients']} clients ({report['config']['limited_clients']} on the "
        f"rpm={report['config']['limited_rpm']} key), load {report['load_s']:.0f}s + drain {report['drain_s']}s, "
        f"wall {report['wall_s']}s, mean 1-min load average {report['load_average_1m_mean']} on "
        f"{os.cpu_count()} CPUs",
        f"requests done {report['requests_done']} (completed {report['completed']}, disconnects "
        f"{report['disconnects']}), intended 429s {report['intended_429']} (the limited key was admitted "
        f"{report['limited_key_admitted']} times), errors {report['errors']}"
        + (f" {report['error_kinds']}" if report["errors"] else ""),
        f"tokens streamed {report['tokens_streamed']} ({report['tokens_per_second']} tok/s), ttft p50/p95 "
        f"{report['ttft_p50_s']}/{report['ttft_p95_s']}s, latency p50/p95 {report['latency_p50_s']}/"
        f"{report['latency_p95_s']}s, core sessions max {report['core_active_sessions_max']}, queued steps max "
        f"{report['core_queued_steps_max']}",
    ]
    cfg = report["config"]
    for name in ("edge", "core"):
        m = mem[name]
        bound = cfg["max_slope_core"] if name == "core" and cfg["max_slope_core"] is not None else cfg["max_slope"]
        lines.append(f"{name} RSS start {m['rss_start_mib']} / end of load {m['rss_end_of_load_mib']} / end "
                     f"{m['rss_end_mib']} / max {m['rss_max_mib']} MiB; slope over 2nd half "
                     f"{m['slope_mib_per_min']} MiB/min (bound {bound}; {m['slope_samples']} samples, range "
                     f"{m['rss_second_half_min_mib']}..{m['rss_second_half_max_mib']}); threads "
                     f"{m['threads_start_end']}, fds {m['fds_start_end']}")
    lines += [
        f"after the clients stopped: {ACTIVE_SESSIONS}={after['core_active_sessions']} "
        f"(zero after {after['seconds_to_zero']}s); edge /metrics with the metrics key: "
        f"HTTP {em['status_with_metrics_key']}, without a key: HTTP {em['status_without_key']}; "
        f"edge requests_total {em.get('requests_total')}",
        f"logs: canaries found {logs['canary_hits']} (prefix {logs['canary_prefix_hits']}) of "
        f"{report['canaries_planted']} planted, secrets found {logs['secret_hits']}; files {logs['files']}",
        "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (clients start requests)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--limited-clients", type=int, default=0, help="clients on the rate-limited key (0 = clients/16)")
    p.add_argument("--limited-rpm", type=int, default=2)
    p.add_argument("--disconnect-rate", type=float, default=0.05)
    p.add_argument("--max-slope", type=float, default=2.0, help="allowed RSS growth, MiB/min over the 2nd half")
    p.add_argument("--max-slope-core", type=float, help="the core's own bound (default: --max-slope)")
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--drain-timeout", type=float, default=420)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--work", type=Path, help="directory for logs, keys and the policy store (default: a temp dir)")
    p.add_argument("--bundles", type=Path, help="directory holding edge/, core/ and bundle.key (cloaked if missing)")
    p.add_argument("--core-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the core (repeatable), e.g. MALLOC_ARENA_MAX=2 to diagnose RSS")
    p.add_argument("--edge-env", action="append", default=[], metavar="K=V", help="the same for the edge")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    a = p.parse_args(argv)
    cfg = SoakConfig(duration=a.duration, clients=a.clients, limited_clients=a.limited_clients,
                     limited_rpm=a.limited_rpm, disconnect_rate=a.disconnect_rate, max_slope=a.max_slope,
                     max_slope_core=a.max_slope_core,
                     sample_every=a.sample_every, drain_timeout=a.drain_timeout, seed=a.seed,
                     core_env=dict(kv.split("=", 1) for kv in a.core_env),
                     edge_env=dict(kv.split("=", 1) for kv in a.edge_env))
    work = a.work or Path(tempfile.mkdtemp(prefix="veil-soak-"))
    bundles = cloak_bundled(a.bundles) if a.bundles else None
    report = run_soak(cfg, work, bundles)
    text = summary(report)
    print(text, flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"report: {a.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
