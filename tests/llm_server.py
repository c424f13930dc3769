"""llama-cpp-python's own OpenAI-compatible server on the cpu preset's GGUF, in a process of its own: the
real remote language model that tests/test_llm_remote.py and the benchmarks point `llm.backend openai` at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.engines import models
from app.engines.llm import LlmSettings
from tests.support import free_port


class LlamaServer:
    """`python -m llama_cpp.server` on a loopback port; its output (uvicorn's request lines, its
    "Disconnected from client" notes) goes to a file that `output()` reads."""

    def __init__(self, *, alias: str = "smollm2-135m", api_key: str = "", port: int | None = None,
                 threads: int | None = None, n_ctx: int = LlmSettings().n_ctx) -> None:
        self.alias = alias
        self.n_ctx = n_ctx
        self.api_key = api_key
        self.port = port or free_port()
        self.threads = threads or os.cpu_count() or 1  # as many as the in-process model takes
        self.gguf = models.resolve(LlmSettings().model, "llm")  # the cpu preset's own reference
        handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(handle)  # reopened for each start, appending
        self._log = Path(name)
        self._process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def env(self) -> dict[str, str]:
        """The settings that point the assistant at this server, as environment variables."""
        values = {"VA_LLM__BACKEND": "openai", "VA_LLM__BASE_URL": self.base_url, "VA_LLM__MODEL": self.alias,
                  "VA_LLM__N_CTX": str(self.n_ctx)}
        return values | ({"VA_LLM__API_KEY": self.api_key} if self.api_key else {})

    def start(self, timeout: float = 60) -> LlamaServer:
        """Start it (again, on the same port) and wait until /v1/models answers."""
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias",
                   self.alias, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                   # The prompt on all cores, as llama-cpp-python does in process (its n_threads_batch default).
                   "--n_threads", str(self.threads), "--n_threads_batch", str(os.cpu_count() or 1),
                   # One request at a time, in turn: by default a new request ends the running one's
                   # stream early (a clean [DONE]), which would cut other sessions' replies short.
                   "--interrupt_requests", "False"]
        command += ["--api_key", self.api_key] if self.api_key else []
        with self._log.open("a") as log:  # unbuffered: its prints must be in the file when they happen
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._environ())
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama_cpp.server did not start:\n{self.output()[-2000:]}")
            time.sleep(0.1)
        return self

    @staticmethod
    def _environ() -> dict[str, str]:
        # Its prints unbuffered, so they are in the file when they happen. And OpenMP threads that sleep
        # when idle: this server computes each token on whichever of its pool's threads comes next, each
        # with an OpenMP team of its own, and teams left spinning starve the active one on few cores
        # (measured here on 2 cores: 400 ms a token instead of 45).
        return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    def _answers(self) -> bool:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            return httpx.get(self.base_url + "/models", headers=headers, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """Die at once, as a crashed or OOM-killed server does: no goodbye on open connections."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            self._process = None

    def output(self) -> str:
        return self._log.read_text(errors="replace")

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)
