"""``lmtune push``: a run's model folder (or only its LoRA adapter) and model card to a Hugging Face Hub repository.

Everything goes up as ONE commit (``create_commit`` with the whole file list, as ``upload_folder`` does), so the
repository never holds half a model. Before that commit lmtune checks, in this order, what can fail without
uploading anything: the local folder and its card (also all ``--dry-run`` does: no network), the user's offline
switch (``HF_HUB_OFFLINE=1`` refuses at once), a token (``HF_TOKEN`` or ``hf auth login``; never printed), the
Hub answering for it (``whoami``), then the repository (``create_repo``, existing ones kept).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from lmtune.errors import HubError, RunError
from lmtune.models.hub import hub_online, offline_by_user
from lmtune.models.registry import check_model_folder
from lmtune.workflows.run import Run

CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
# lmtune writes safetensors only; a pickle in the folder was put there by someone else and is not shared on.
_PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class PushFile:
    """One file of the commit: ``local`` (None for what lmtune writes for the upload) -> ``repo_path``."""

    repo_path: str
    size: int
    local: Path | None = None
    content: bytes | None = field(default=None, repr=False)

    def operation(self) -> CommitOperationAdd:
        """The commit operation that adds this file."""
        source: str | bytes = str(self.local) if self.local is not None else (self.content or b"")
        return CommitOperationAdd(path_in_repo=self.repo_path, path_or_fileobj=source)


@dataclass(frozen=True)
class PushPlan:
    """What a push uploads: from which folder, every file, and the card (parsed back as the Hub will read it)."""

    repo_id: str
    source: Path
    adapter: bool
    files: list[PushFile]
    card: ModelCard

    @property
    def metadata(self) -> dict[str, Any]:
        """The card's Hub metadata (its YAML front matter) as a dict, ``model-index`` included."""
        return dict(self.card.data.to_dict())

    def describe(self) -> list[str]:
        """Lines for the terminal: each file, local path -> repo path with its size, then the card's metadata."""
        width = max(len(f.repo_path) for f in self.files)
        lines = [f"{len(self.files)} files, {_size(sum(f.size for f in self.files))}, from {self.source} "
                 f"to https://huggingface.co/{self.repo_id} in one commit:"]
        for f in self.files:
            origin = str(f.local) if f.local is not None else "(written by lmtune)"
            lines.append(f"  {f.repo_path:<{width}}  {_size(f.size):>9}  <- {origin}")
        lines += ["model card metadata:", *("  " + line for line in self.card.data.to_yaml().splitlines())]
        return lines


def plan_push(run: str | os.PathLike[str], repo_id: str, *, adapter: bool = False) -> PushPlan:
    """The files and card :func:`push` would upload; reads only local files (this is ``--dry-run``).

    The model folder is checked as a loadable safetensors model (an adapter: ``adapter_model.safetensors``)
    and its card is parsed back with huggingface_hub's ``ModelCard``, as the Hub reads it. With ``adapter``,
    the card says ``library_name: peft`` and the adapter's ``base_model_name_or_path`` (a local path on this
    machine) becomes the base model's Hub id where there is one.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"--repo '{repo_id}' is not a Hub repository id: {exc}",
                       hint="write it as org/name or user/name") from None
    if "/" not in repo_id:
        raise HubError(f"--repo '{repo_id}' names no owner", hint=f"write it as user/{repo_id} or org/{repo_id}")
    found = Run.load(Path(run))
    card = _read_card(found.model_dir)
    # With method.merge false the model folder is itself an adapter (and tokenizer): it goes up as one.
    saved_adapter = found.meta.get("saved_as") == "adapter"
    if adapter or saved_adapter:
        # --adapter: the run's adapter/ folder; a model folder that is an adapter goes up whole (with its tokenizer).
        source = found.path / "adapter" if adapter and (found.path / "adapter").is_dir() else found.model_dir
        if not (source / "adapter_model.safetensors").is_file():
            raise RunError(f"this run has no LoRA adapter to push (method {found.meta.get('method', '?')})",
                           file=source, hint="push the whole model: leave out --adapter")
        card = _adapter_card(card)
        adapter = True
    else:
        source = found.model_dir
        check_model_folder(source)
    files = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source).as_posix()
        if path.suffix.lower() in _PICKLED:
            raise RunError(f"refusing to push pickled weights {relative}: lmtune shares safetensors only",
                           file=path, hint="lmtune never writes them; remove the file, it was put there by hand")
        if relative == CARD or relative.startswith("."):
            continue
        base_model = card_data(card).base_model
        if adapter and relative == ADAPTER_CONFIG and base_model:
            content = _adapter_config_for_hub(path, str(base_model))
            files.append(PushFile(repo_path=relative, size=len(content), content=content))
            continue
        files.append(PushFile(repo_path=relative, size=path.stat().st_size, local=path))
    text = str(card)
    files.append(PushFile(repo_path=CARD, size=len(text.encode("utf-8")), content=text.encode("utf-8")))
    # What is uploaded, parsed back as the Hub will parse it (the model-index into EvalResults included).
    return PushPlan(repo_id=repo_id, source=source, adapter=adapter, files=files, card=ModelCard(text))


def push_run(run: str | os.PathLike[str], repo_id: str, *, private: bool = False,
             adapter: bool = False) -> dict[str, Any]:
    """Upload the run's model (or its LoRA adapter, with ``adapter``) and card to ``repo_id`` as one commit.

    The repository is created if missing (``private`` applies then only; an existing one keeps its
    visibility). Every failure before the commit (offline, no token, a refused token, no network, no right to
    the repository) is a HubError and nothing is uploaded. Returns the repository and commit URLs and the
    commit id.
    """
    plan = plan_push(run, repo_id, adapter=adapter)
    offline = offline_by_user()
    if offline is not None:
        raise HubError(f"{offline} is set: pushing needs the Hugging Face Hub, so nothing was uploaded",
                       hint=f"unset {offline.split('=')[0]} to push, or see what would go up with --dry-run")
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: nothing was uploaded",
                       hint="log in with `hf auth login`, or set HF_TOKEN to a token with write access")
    api = HfApi(token=token)
    with hub_online():
        user = _call(lambda: api.whoami(), "checking the token")
        repo_url = _call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                         f"creating the repository {repo_id}")
        what = "the LoRA adapter" if plan.adapter else "the model"
        commit = _call(lambda: api.create_commit(
            repo_id, operations=[f.operation() for f in plan.files], repo_type="model",
            commit_message=f"lmtune: {what} of run {Path(run).resolve().name}"), f"uploading to {repo_id}")
    return {"repo_id": repo_id, "url": str(repo_url), "commit": commit.oid, "commit_url": commit.commit_url,
            "user": user.get("name"), "files": len(plan.files), "bytes": sum(f.size for f in plan.files)}


def _call(step: Any, doing: str) -> Any:
    """``step()``, its network and HTTP failures as HubErrors that say what was being done (never the token)."""
    try:
        return step()
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise HubError(f"cannot reach the Hugging Face Hub while {doing} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no answer'})",
                       hint="check the network (and HF_ENDPOINT or proxy settings) and run again; if the commit "
                       "had not started nothing was uploaded, and a commit is never applied by halves") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = {401: "the token was refused: log in again with `hf auth login`, or set HF_TOKEN to a valid one",
                403: "the token may not write there: use a token with write access, and a repository of your "
                     "own or of an organisation you may write to"}.get(status or 0, "run again later")
        raise HubError(f"the Hub refused {doing} (HTTP {status}): {str(exc).splitlines()[0]}", hint=hint) from None


def card_data(card: ModelCard) -> ModelCardData:
    """A model card's metadata, typed (``ModelCard.data`` is declared as the base ``CardData``)."""
    if not isinstance(card.data, ModelCardData):
        raise TypeError(f"a ModelCard holds ModelCardData, not {type(card.data).__name__}")
    return card.data


def _read_card(model_dir: Path) -> ModelCard:
    """The run's model card, parsed as the Hub parses it; a minimal one for a folder that lacks it."""
    path = model_dir / CARD
    if not path.is_file():
        data = ModelCardData(library_name="transformers", tags=["lmtune"])
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {model_dir.parent.name}\n\nFine-tuned with lmtune.\n")
    try:
        return ModelCard(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"the model card's metadata does not parse: {exc}", file=path,
                       hint="fix its YAML front matter, or train again to write a new card") from None


def _adapter_card(card: ModelCard) -> ModelCard:
    """The run's card for a repository that holds only the LoRA adapter: ``library_name: peft``, how to load it."""
    data = card_data(card)
    data.library_name = "peft"
    data.tags = list(dict.fromkeys([*(data.tags or []), "peft", "lora"]))
    base = data.base_model or "the base model"
    note = (f"\n> This repository holds only the LoRA adapter, for `{base}`: load it with peft "
            "(`AutoPeftModel.from_pretrained(repo)`), or merge it with `lmtune export RUN --format merged`.\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{note}{card.text}")


def _adapter_config_for_hub(path: Path, base_model: str) -> bytes:
    """``adapter_config.json`` with ``base_model_name_or_path`` set to the Hub id (it holds a local path)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read the adapter config: {exc}", file=path) from None
    config["base_model_name_or_path"] = base_model
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
