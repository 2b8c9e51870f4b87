"""Pretrained models from the Hugging Face Hub, through huggingface_hub's own cache: opt-in downloads, offline reuse.

``model: org/name`` (optionally ``model.revision``: a branch, tag or commit) names a Hub model. It always
resolves to a snapshot folder of the Hugging Face cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``, default
``~/.cache/huggingface/hub``)::

    models--org--name/refs/main                          the commit a branch or tag points at
    models--org--name/snapshots/<40-hex commit>/...       the files (links into blobs/)

so whatever loads it later (predict, serve, export, a LoRA run's base model) reads a plain local folder.

Downloads are off by default. lmtune downloads only when ``model.download`` is true AND the environment does
not forbid it: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value by the user. (lmtune sets
``HF_HUB_OFFLINE=1`` for itself when it is unset, so that no library reaches the network behind its back; it
marks that default with :data:`~lmtune.console.HUB_OFFLINE_DEFAULT`, so the user's own setting can be told
apart.) Otherwise the id resolves from the cache or fails with the command that fetches it.

What is fetched is only what lmtune loads: the repository's top-level ``*.safetensors`` weights, its JSON files
(config, tokenizer, index), tokenizer vocabularies and the model card (for its license). Never a pickle
(``*.bin``, ``*.pt``), never Python code: a repository with no safetensors weights is refused before anything
is downloaded, and ``trust_remote_code`` is refused for a Hub id.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lmtune.console import HUB_OFFLINE_DEFAULT
from lmtune.errors import ModelError

log = logging.getLogger(__name__)

# "org/name" as the Hub spells ids; "./org/name" or an absolute path is clearly meant as a folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a download fetches, among the repository's top-level files: weights as safetensors only, the JSON files
# (config.json, tokenizer.json, tokenizer_config.json, generation_config.json, the shard index), tokenizer
# vocabularies (vocab.txt, merges.txt, tokenizer.model, spiece.model, *.tiktoken), a chat template file and the
# model card. Nothing that unpickles (*.bin, *.pt, *.pth) or that runs (*.py).
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md")
_TRUE = {"1", "on", "yes", "true"}
# (repo id, revision, cache) -> the snapshot downloaded (or confirmed current) in this process.
_DOWNLOADED: dict[tuple[str, str | None, str], Path] = {}


@dataclass(frozen=True)
class HubSnapshot:
    """Where a Hub id resolved to: the repository, the revision asked for (None: the default branch), the commit
    it stands at and the snapshot folder in the Hugging Face cache."""

    repo_id: str
    revision: str | None
    commit: str
    path: Path

    def record(self) -> dict[str, Any]:
        """The JSON record a run keeps (``lmtune.json``'s ``base_model_hub``, ``run.json``)."""
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled like a Hub model id (``org/name``); the caller checks first that it is no folder."""
    return bool(HUB_ID.match(text)) and ".." not in text and "--" not in text


def offline_by_user() -> str | None:
    """The variable by which the user's environment forbids the Hub (``TRANSFORMERS_OFFLINE`` or ``HF_HUB_OFFLINE``
    set true, as ``NAME=value``), else None.

    lmtune's own default of ``HF_HUB_OFFLINE=1`` (marked by :data:`~lmtune.console.HUB_OFFLINE_DEFAULT`) does
    not count: it keeps libraries offline, not the user's explicit ``model.download: true`` or ``lmtune push``.
    """
    for name in ("TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE"):
        value = os.environ.get(name, "")
        if value.strip().lower() in _TRUE and not (name == "HF_HUB_OFFLINE" and os.environ.get(HUB_OFFLINE_DEFAULT)):
            return f"{name}={value}"
    return None


def downloads_allowed(download: bool) -> bool:
    """Whether lmtune may download a Hub model: ``model.download`` true and the environment not offline."""
    return download and offline_by_user() is None


def fetch_command(repo_id: str, revision: str | None) -> str:
    """The shell command that puts the files lmtune loads for ``repo_id`` into the Hugging Face cache."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f"--include '{p}'" for p in DOWNLOAD_PATTERNS)
    return f"hf download {repo_id}{rev} {include}"


def snapshot_of(path: str | os.PathLike[str] | None, revision: str | None = None) -> HubSnapshot | None:
    """The Hub snapshot ``path`` is (``.../models--org--name/snapshots/<commit>``), else None; ``revision`` is
    what was asked for (``model.revision``).

    Read from the folder's place in the cache, so a run records the exact commit it trained from without
    asking the Hub again.
    """
    if path is None:
        return None
    folder = Path(path)
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--") or not COMMIT.match(folder.name):
        return None
    return HubSnapshot(repo_id=repo.removeprefix("models--").replace("--", "/"), revision=revision,
                       commit=folder.name, path=folder)


def resolve_hub_model(repo_id: str, *, revision: str | None = None, download: bool = False) -> HubSnapshot:
    """The cache snapshot of ``repo_id`` at ``revision``, downloaded first if :func:`downloads_allowed`.

    Offline, the revision resolves through the cache's ``refs/`` (a commit hash directly to its snapshot);
    when it is not there, a ModelError says how to fetch it (no network is tried). Online, a repository whose
    top level has no ``*.safetensors`` is refused before anything is downloaded. If the Hub cannot be reached
    but the snapshot is cached, the cached one is used, with a warning.
    """
    if downloads_allowed(download):
        # One run asks several times (the task, the tokenizer, the report): the Hub is asked once per process,
        # so every part of a run uses the same commit even if the branch moves meanwhile.
        key = (repo_id, revision, str(constants.HF_HUB_CACHE))
        snapshot = _DOWNLOADED.get(key) or _download(repo_id, revision)
        if snapshot.is_dir():
            _DOWNLOADED[key] = snapshot
    else:
        snapshot = _from_cache(repo_id, revision, why=_offline_reason(download))
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=snapshot.name, path=snapshot)


def _offline_reason(download: bool) -> str:
    if not download:
        return "downloads are off (model.download is false)"
    return f"downloads are off ({offline_by_user()} is set, which wins over model.download)"


def _from_cache(repo_id: str, revision: str | None, *, why: str, error: Exception | None = None) -> Path:
    """The cached snapshot folder, or a ModelError naming the cache and the command that fills it."""
    try:
        # Only config.json is asked for: lmtune's own folder check then says what else is missing (a shard,
        # the weights), where huggingface_hub would want every file of the repository it once listed.
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
    except HFValidationError as exc:
        raise ModelError(f"'{repo_id}' is not a valid Hub model id: {exc}", field="model.name") from None
    except LocalEntryNotFoundError:
        at = f" at revision '{revision}'" if revision else ""
        where = f"{repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        cause = f": the Hub could not be reached ({_short(error)})" if error is not None else f" and {why}"
        instead = ("check the network (and HF_ENDPOINT or proxy settings) and run again" if error is not None else
                   "or set model.download: true with HF_HUB_OFFLINE unset, to let lmtune download it")
        raise ModelError(
            f"no local folder '{repo_id}', and the Hub model {where}{cause}",
            field="model.name",
            hint=f"fetch it once: {fetch_command(repo_id, revision)} (HF_HUB_CACHE or HF_HOME say which cache "
            f"lmtune reads); {instead}",
        ) from None
    return Path(folder)


@contextlib.contextmanager
def hub_online() -> Iterator[None]:
    """Let huggingface_hub reach the Hub inside the block, for a use the user asked for explicitly.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, and lmtune sets it to 1 by default; callers check
    :func:`offline_by_user` first, so this lifts only lmtune's own default, for the block's duration.
    """
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def files_to_download(files: list[str]) -> list[str]:
    """Of a repository's ``files``, those lmtune loads: top-level files matching :data:`DOWNLOAD_PATTERNS`
    (sub-folders hold other formats or duplicates: ``onnx/``, ``original/``), never a pickle or code."""
    return [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in DOWNLOAD_PATTERNS)]


def _download(repo_id: str, revision: str | None) -> Path:
    """Download the loadable files of ``repo_id`` (safetensors only) into the cache; the snapshot folder."""
    api = HfApi()
    at = f" at revision '{revision}'" if revision else ""
    try:
        with hub_online():
            info = api.model_info(repo_id, revision=revision)
    except HFValidationError as exc:
        raise ModelError(f"'{repo_id}' is not a valid Hub model id: {exc}", field="model.name") from None
    except GatedRepoError:
        raise ModelError(f"the Hub model {repo_id} is gated: your account must accept its terms first",
                         field="model.name", hint=f"accept them on https://huggingface.co/{repo_id}, then log in "
                         "(hf auth login, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelError(f"the Hub model {repo_id} has no revision '{revision}'", field="model.revision",
                         hint="give a branch, a tag or a commit hash of the repository") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no Hub model {repo_id} (or it is private and no token with access to it was given)",
                         field="model.name", hint="check the id; for a private model log in (hf auth login, or "
                         "set HF_TOKEN)") from None
    except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
        # Unreachable (or down): a snapshot downloaded before still serves.
        folder = _from_cache(repo_id, revision, why="", error=exc)
        log.warning("the Hub could not be reached (%s); using the cached snapshot %s of %s", _short(exc),
                    folder.name[:12], repo_id)
        return folder
    files = [s.rfilename for s in info.siblings or []]
    wanted = files_to_download(files)
    if not any(f.endswith(".safetensors") for f in wanted):
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        found = f" (it has {', '.join(pickled[:4])}, pickled weights lmtune never loads)" if pickled else ""
        raise ModelError(
            f"the Hub model {repo_id}{at} has no safetensors weights{found}",
            field="model.name",
            hint="lmtune loads safetensors only. The Hub's conversion bot often opens a pull request with "
            "safetensors weights: look under the repository's Community tab and set model.revision: refs/pr/N; "
            "or convert the weights yourself where you trust the file and give the local folder",
        )
    log.info("downloading %s%s (%d files: safetensors, JSON, tokenizer) into %s", repo_id, at, len(wanted),
             constants.HF_HUB_CACHE)
    try:
        with hub_online():
            downloaded = snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
    except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise ModelError(f"downloading {repo_id}{at} failed: {_short(exc)}", field="model.name",
                         hint="check the network and run again: what was downloaded is kept in the cache") from None
    return Path(downloaded)


def _short(exc: BaseException) -> str:
    """An exception as one line: its first line, with its class name."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
