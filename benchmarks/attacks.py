"""The attacks of issue 29 against a server that listens beyond loopback, each with what held.

bench_soak.py --attacks runs them against the cpu preset served as `serve --lan` serves it (all interfaces,
HTTPS, pairing), bound to loopback here so that nothing opens to the network, and with loopback clients not
trusted, so that this process is a stranger on the network until it pairs. Each attack returns an Outcome:
whether the server held, and what it did.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app.web import lan
from tests.support import encode_webm_opus


class Outcome(msgspec.Struct):
    attack: str
    held: bool
    detail: str


class Target(msgspec.Struct):
    """The server under attack: its https base URL, pairing token, TLS folder, and what its access log wrote."""

    url: str
    token: str
    folder: Path
    access_log: list[str]
    limits: dict  # the server's LimitSettings, as a dict
    max_turn_s: float

    @property
    def ws(self) -> str:
        return self.url.replace("https", "wss", 1)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


TLS = ssl.create_default_context()
TLS.check_hostname, TLS.verify_mode = False, ssl.CERT_NONE  # the server's own self-signed certificate


def request(target: Target, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    parts = urlsplit(target.url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=TLS, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode("latin-1")
    finally:
        conn.close()


def bearer(target: Target) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.token}"}


@contextmanager
def socket_to(target: Target, path: str, headers: dict[str, str] | None = None) -> Iterator[ClientConnection]:
    with connect(target.ws + path, ssl=TLS, additional_headers=headers or {}, max_size=None,
                 open_timeout=30) as ws:
        yield ws


def refused_socket(target: Target, path: str, headers: dict[str, str]) -> str:
    """'refused <status>' or what the server said first."""
    try:
        with socket_to(target, path, headers) as ws:
            return f"accepted: {ws.recv(timeout=30)[:80]}"
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"


def events_until(ws: ClientConnection, done: Callable[[dict], bool], timeout: float = 60) -> list[dict]:
    """Text events until one satisfies `done` (or the time runs out, or the server closes)."""
    events, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(message, str):
                events.append(json.loads(message))
                if done(events[-1]):
                    break
    except (TimeoutError, ConnectionClosed):
        pass
    return events


def errors(events: list[dict]) -> list[str]:
    return [(e.get("error") or e).get("code", "?") for e in events if e.get("type") == "error"]


# ---------------------------------------------------------------- the attacks, by the points


def unpaired_sessions(target: Target) -> Outcome:
    """1. A program on the network, claiming to be loopback, without Origin or token."""
    seen = {path: refused_socket(target, path, {"Host": "127.0.0.1"}) for path in ("/ws", "/v1/realtime")}
    held = all(v.startswith("refused") for v in seen.values())
    return Outcome("session without pairing (Host: 127.0.0.1, no Origin)", held, json.dumps(seen))


def openapi_pages(target: Target) -> Outcome:
    """2. Litestar's schema pages."""
    seen = {path: request(target, path)[0] for path in ("/schema", "/schema/swagger", "/schema/redoc",
                                                        "/schema/openapi.json")}
    return Outcome("OpenAPI pages", all(code == 404 for code in seen.values()), json.dumps(seen))


def health_for_strangers(target: Target) -> Outcome:
    """3. An unpaired /health names no model, backend or error."""
    _, _, body = request(target, "/health")
    keys = set(json.loads(body))
    paired_keys = set(json.loads(request(target, "/health", headers=bearer(target))[2]))
    held = keys <= {"status", "phase", "done_bytes", "total_bytes", "progress"} and "llm_backend" in paired_keys
    return Outcome("unpaired /health", held, f"stranger sees {sorted(keys)}; paired sees {sorted(paired_keys)}")


def framing(target: Target) -> Outcome:
    """6. Any site framing the page (paired, so that the page itself is served)."""
    pages = {"/": request(target, "/", headers=bearer(target))[1], "pairing": request(target, "/")[1]}
    seen = {}
    for name, headers in pages.items():
        csp = headers.get("content-security-policy", "")
        seen[name] = {"frame-ancestors 'self'": "frame-ancestors 'self'" in csp,
                      "script-src 'self'": "script-src 'self'" in csp and "unsafe" not in csp.split("script-src")[1]
                      .split(";")[0], "x-frame-options": headers.get("x-frame-options", "")}
    held = all(v["frame-ancestors 'self'"] and v["script-src 'self'"] and v["x-frame-options"] for v in seen.values())
    return Outcome("framing and foreign scripts", held, json.dumps(seen))


def cookie_and_token(target: Target) -> Outcome:
    """7. The pairing cookie: not the token, __Host-, 30 days; neither works in the other's place; the page
    that shows the token is not cached; the access log never has the token."""
    status, headers, _ = request(target, f"/?token={target.token}")
    set_cookie = headers.get("set-cookie", "")
    name, _, rest = set_cookie.partition("=")
    value = rest.split(";")[0]
    max_age = next((int(p.split("=")[1]) for p in set_cookie.lower().split("; ") if p.startswith("max-age=")), 0)
    as_bearer = request(target, "/metrics", headers={"Authorization": f"Bearer {value}"})[0]
    token_as_cookie = request(target, "/metrics", headers={"Cookie": f"{name}={target.token}"})[0]
    with_cookie = request(target, "/", headers={"Cookie": f"{name}={value}"})
    checks = {
        "303 to the clean address": status == 303 and headers.get("location") == "/",
        "__Host- cookie, not the token": name.startswith("__Host-") and value and value != target.token,
        "at most 30 days": 0 < max_age <= 30 * 86400,
        "cookie refused as bearer": as_bearer == 401,
        "token refused as cookie": token_as_cookie == 401,
        "cookie opens the page": with_cookie[0] == 200,
        "page not cached": "no-store" in with_cookie[1].get("cache-control", ""),
        "token never logged": bool(target.access_log) and not any(target.token in line for line in target.access_log),
    }
    return Outcome("pairing cookie and token", all(checks.values()), json.dumps(checks))


def forget_devices(target: Target) -> Outcome:
    """7. A paired device forgotten from the page can no longer get in."""
    _, headers, _ = request(target, f"/?token={target.token}")
    cookie = headers.get("set-cookie", "").split(";")[0]
    before = request(target, "/metrics", headers={"Cookie": cookie})[0]
    origin = {"Origin": target.url, "Cookie": cookie}
    foreign = request(target, "/devices/forget-all", "POST", headers={**origin, "Origin": "https://evil.example"})[0]
    forgot = request(target, "/devices/forget-all", "POST", headers=origin)[0]
    after = request(target, "/metrics", headers={"Cookie": cookie})[0]
    checks = {"paired before": before == 200, "foreign page refused": foreign in (400, 403),
              "forgotten": forgot in (200, 204, 303), "refused after": after == 401}
    return Outcome("forget devices", all(checks.values()), json.dumps(checks))


def file_permissions(target: Target) -> Outcome:
    """8. The key, token and device files are the owner's alone, and so is their folder (the certificate is
    public: every browser is shown it)."""
    secrets = [target.folder, *(p for p in target.folder.iterdir() if p.name != "cert.pem")]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in secrets}
    shared = target.folder.parent / "shared"
    private(shared)
    (shared / "token").write_text(target.token)
    os.chmod(shared / "token", 0o644)
    try:
        lan.pairing_token(shared)
        refused = "a token others can read was used"
    except lan.ExposedSecret as exc:
        refused = str(exc)
    held = all(m in ("0o600", "0o700") for m in modes.values()) and len(modes) == 4 and "chmod 600" in refused
    return Outcome("key, token and folder permissions", held, f"{json.dumps(modes)}; {refused}")


def realtime_items(target: Target) -> Outcome:
    """4. Items piled up without a response, then audio items past the longest turn."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 1500}]}
    accepted, codes = 0, []
    with socket_to(target, "/v1/realtime", bearer(target)) as ws:
        events_until(ws, lambda e: e["type"] == "session.created")
        for _ in range(2000):
            ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        answers = 0

        def all_answered(event: dict) -> bool:
            nonlocal answers
            answers += event["type"] in ("conversation.item.added", "error")
            return answers >= 2000

        got = events_until(ws, all_answered, timeout=20)
        accepted = sum(e["type"] == "conversation.item.added" for e in got)
        codes = sorted(set(errors(got)))
        ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
        done = events_until(ws, lambda e: e["type"] == "response.done", timeout=300)
        ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        after = events_until(ws, lambda e: e["type"] in ("conversation.item.added", "error"), timeout=30)
    answered = bool(done) and done[-1]["type"] == "response.done" and done[-1]["response"]["status"] == "completed"
    goes_on = answered and bool(after) and after[-1]["type"] == "conversation.item.added"
    audio = _audio_item_refusal(target)
    held = 0 < accepted < 2000 and bool(codes) and goes_on and audio[0]
    return Outcome("2000 realtime items of 1.5 KB, then audio items past max_turn_s", held,
                   f"accepted {accepted} items, then {codes}; answered them: {answered}, took an item after: "
                   f"{goes_on}; audio: {audio[1]}")


def _audio_item_refusal(target: Target) -> tuple[bool, str]:
    seconds = 8.0
    pcm = (np.sin(np.arange(int(24_000 * seconds)) * 0.05) * 3000).astype("<i2").tobytes()
    item = {"type": "message", "role": "user", "content": [{"type": "input_audio",
                                                             "audio": base64.b64encode(pcm).decode()}]}
    n = int(target.max_turn_s // seconds) + 2
    with socket_to(target, "/v1/realtime", bearer(target)) as ws:
        events_until(ws, lambda e: e["type"] == "session.created")
        for _ in range(n):
            ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        got = events_until(ws, lambda e: len(errors([e])) > 0, timeout=30)
    added = sum(e["type"] == "conversation.item.added" for e in got)
    return bool(errors(got)) and added * seconds <= target.max_turn_s, f"{added} of {n} {seconds:.0f} s items, " \
        f"then {errors(got)}"


def audio_too_fast(target: Target) -> Outcome:
    """5. Audio at 10x real time for 20 s, on /v1/realtime with server VAD."""
    second = (np.random.default_rng(0).normal(0, 0.01, 24_000) * 32767).astype("<i2").tobytes()
    chunk = base64.b64encode(second[: len(second) // 10]).decode()  # 100 ms
    sent_s, t0 = 0.0, time.monotonic()
    with socket_to(target, "/v1/realtime", bearer(target)) as ws:
        events_until(ws, lambda e: e["type"] == "session.created")
        while time.monotonic() - t0 < 20:
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            sent_s += 0.1
            time.sleep(0.01)
        got = events_until(ws, lambda e: False, timeout=3)
    codes = errors(got)
    wall = time.monotonic() - t0
    return Outcome("audio at 10x real time", bool(codes), f"sent {sent_s:.0f} s of audio in {wall:.0f} s: {codes[:3]}")


def decoder_formats(target: Target) -> Outcome:
    """9. A WebM stream declared as Ogg, and an unknown container: never probed."""
    pcm = (np.sin(np.arange(16_000) * 0.05) * 0.3).astype(np.float32)
    pieces = encode_webm_opus(pcm, 16_000)
    seen = {}
    for mime in ("audio/ogg;codecs=opus", "application/x-anything"):
        with socket_to(target, "/ws", bearer(target)) as ws:
            events_until(ws, lambda e: e["type"] == "ready")
            ws.send(json.dumps({"type": "audio_start", "mime_type": mime}))
            for piece in pieces:
                ws.send(piece)
            ws.send(json.dumps({"type": "audio_stop"}))
            seen[mime] = errors(events_until(ws, lambda e: e["type"] == "error", timeout=20))
    held = all("bad_audio" in codes for codes in seen.values())
    return Outcome("WebM declared as Ogg, an unknown container", held, json.dumps(seen))


def sessions_per_client(target: Target) -> Outcome:
    """5. One address opening more sessions than it may hold."""
    wanted = target.limits["max_sessions_per_client"]
    opened: list[ClientConnection] = []
    answers: list[str] = []
    try:
        for _ in range(wanted + 1):
            t0 = time.monotonic()
            ws = connect(target.ws + "/ws", ssl=TLS, additional_headers=bearer(target), open_timeout=30)
            opened.append(ws)
            first = json.loads(ws.recv(timeout=30))
            answers.append(f"{first.get('code') or first['type']} in {time.monotonic() - t0:.1f} s")
    finally:
        for ws in opened:
            ws.close()
    held = all(a.startswith("ready") for a in answers[:-1]) and answers[-1].startswith("too_many_sessions")
    return Outcome(f"{wanted + 1} sessions from one address", held, "; ".join(answers))


def idle_session(target: Target) -> Outcome:
    """5. A session that says nothing is closed after the idle time, with a reason."""
    idle_s = target.limits["idle_timeout_s"]
    t0 = time.monotonic()
    with socket_to(target, "/ws", bearer(target)) as ws:
        got = events_until(ws, lambda e: e.get("code") == "idle", timeout=idle_s + 30)
    waited = time.monotonic() - t0
    held = "idle" in errors(got)
    return Outcome(f"a session idle for {idle_s} s", held, f"closed with {errors(got)} after {waited:.0f} s")


ATTACKS = [unpaired_sessions, openapi_pages, health_for_strangers, framing, cookie_and_token, forget_devices,
           file_permissions, realtime_items, audio_too_fast, decoder_formats, sessions_per_client, idle_session]


def run(target: Target) -> list[Outcome]:
    outcomes = []
    for attack in ATTACKS:
        try:
            outcome = attack(target)
        except Exception as exc:  # an attack that breaks the benchmark is a finding too
            outcome = Outcome(attack.__name__, False, f"the attack failed: {exc!r}")
        print(f"{'held  ' if outcome.held else 'FAILED'}  {outcome.attack}: {outcome.detail}", flush=True)
        outcomes.append(outcome)
    return outcomes


class AccessLog(logging.Handler):
    """Keeps the lines uvicorn's access log writes, as they would be printed."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def private(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder
