"""Start-up progress, shared by the log, GET /health and the page's status line: what the server is
doing before it can talk (loading, downloading, warming up), and a watcher that counts a hub download.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import msgspec

log = logging.getLogger(__name__)

Phase = Literal["loading", "downloading", "warming", "ready", "failed"]
LOG_EVERY_S = 10.0  # a log line this often while a download runs
POLL_S = 0.5  # how often the status (and so the page) sees new bytes


class LoadState(msgspec.Struct, frozen=True):
    """One moment of start-up. Frozen and replaced whole, so a reader never sees half an update."""

    phase: Phase = "loading"
    message: str = "starting"
    done_bytes: int = 0  # of the download in progress (phase "downloading")
    total_bytes: int = 0  # 0 when the hub did not say

    @property
    def finished(self) -> bool:
        return self.phase in ("ready", "failed")


class LoadStatus:
    """The server's current LoadState: written by the loading thread, read by the routes."""

    def __init__(self, state: LoadState | None = None) -> None:
        self._state = state or LoadState()
        self._finished = threading.Event()
        if self._state.finished:
            self._finished.set()

    @property
    def state(self) -> LoadState:
        return self._state

    def set(self, phase: Phase, message: str, done_bytes: int = 0, total_bytes: int = 0) -> None:
        self._state = LoadState(phase, message, done_bytes, total_bytes)
        if phase in ("ready", "failed"):
            self._finished.set()

    def wait(self, timeout: float | None = None) -> LoadState:
        """Block until ready or failed (or the timeout); returns the state then."""
        self._finished.wait(timeout)
        return self._state


# ---------------------------------------------------------------- download progress


def _unit(total: int) -> tuple[float, str, str]:
    return (1e9, "GB", ".1f") if total >= 1e9 else (1e6, "MB", ".0f")


def progress_text(label: str, done: int, total: int) -> str:
    """'downloading CSM checkpoint 3.1 of 6.2 GB (50%)', in the unit of the whole file."""
    if total <= 0:
        scale, unit, fmt = _unit(done)
        return f"downloading {label}: {done / scale:{fmt}} {unit} so far"
    scale, unit, fmt = _unit(total)
    percent = min(100, int(100 * done / total))
    return f"downloading {label} {done / scale:{fmt}} of {total / scale:{fmt}} {unit} ({percent}%)"


class DownloadProgress:
    """A tqdm-like counter of one download (`update(n)`, `n`, `total`): every update goes to the status,
    and a log line every ~10 s, so a long first launch shows it is alive without flooding the log."""

    def __init__(
        self,
        label: str,
        total: int = 0,
        *,
        status: LoadStatus | None = None,
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.n = 0
        self.status = status
        self.log_every_s = log_every_s
        self._clock = clock
        self._logged = clock()

    @property
    def text(self) -> str:
        return progress_text(self.label, self.n, self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.status is not None:
            self.status.set("downloading", self.text, self.n, self.total)
        now = self._clock()
        if now - self._logged >= self.log_every_s:
            self._logged = now
            log.info("%s", self.text)

    def close(self) -> None:
        if not self.n:
            return  # nothing came: the file was in the cache
        log.info("downloaded %s (%.0f MB)", self.label, self.n / 1e6)
        if self.status is not None:
            self.status.set("loading", f"downloaded {self.label}")


def folder_bytes(folder: Path) -> int:
    """Bytes written into the files of `folder`: a preallocated (sparse) file counts what it holds."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # renamed or removed between the listing and the stat
        if entry.is_file(follow_symlinks=False):
            total += min(st.st_size, st.st_blocks * 512)
    return total


def hub_blobs_folder(repo: str) -> Path:
    """Where huggingface_hub writes the files of a model repo (documented cache layout)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "blobs"


@contextmanager
def watch_hub_download(
    repo: str,
    label: str,
    *,
    status: LoadStatus | None = None,
    total: Callable[[], int] | None = None,
    poll_s: float | None = None,
    log_every_s: float | None = None,
) -> Iterator[DownloadProgress]:
    """Count the bytes that arrive in the repo's cache folder while the block downloads.

    The hub's own progress bars cannot be hooked for this: hf_hub_download (0.x) takes no tqdm
    class, snapshot_download's counts files, and both bars switch themselves off without a terminal
    (a container's log). Every byte, over HTTP or hf_xet, lands in this folder (as `.incomplete` or
    a temporary file beside it), so watching it works whichever way the file comes. `total` (a hub
    metadata request) runs only once bytes do arrive, so a cached model costs no extra request.
    """
    progress = DownloadProgress(label, status=status, log_every_s=log_every_s or LOG_EVERY_S)
    arrivals = _Arrivals(hub_blobs_folder(repo), progress, total)
    with _every(poll_s or POLL_S, arrivals.count, name=f"download-progress {repo}"):
        yield progress
    arrivals.count()  # only after a download that succeeded: its last bytes, so it reads 100%
    progress.close()


class _Arrivals:
    """The bytes a folder gained since this was made, fed to `progress` (the size asked for once)."""

    def __init__(self, folder: Path, progress: DownloadProgress, total: Callable[[], int] | None) -> None:
        self.folder = folder
        self.progress = progress
        self.total = total
        self.baseline = folder_bytes(folder)
        self.size_asked = total is None

    def count(self) -> None:
        grown = folder_bytes(self.folder) - self.baseline
        if grown <= self.progress.n:
            return
        if not self.size_asked:
            self.size_asked = True
            self.progress.total = _safe_size(self.total)
        self.progress.update(grown - self.progress.n)


@contextmanager
def _every(period_s: float, action: Callable[[], None], *, name: str) -> Iterator[None]:
    """Run `action` every `period_s` on a thread of its own while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _safe_size(total: Callable[[], int] | None) -> int:
    try:
        return max(0, int(total())) if total is not None else 0
    except Exception as exc:  # progress is a nicety: never let it break the download
        log.debug("could not read the download size: %s", exc)
        return 0  # shown as "... so far"
