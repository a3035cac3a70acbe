"""Upload a pack (or a per-feature JSON directory, or a graph directory) to a Hugging Face model repo.

The directory must pass ``verify`` first: a broken pack on the Hub fails silently in users' browsers. Uploads go
through ``upload_large_folder`` (resumable, several commits for big packs). It has no ``path_in_repo``, so the
files are laid out under a staging folder of symlinks, kept in the user cache so that a rerun resumes. The token
comes from ``HF_TOKEN`` or the huggingface_hub login and is never printed or stored by this module.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from featurestore.errors import UserError

from .integrity import verify

_REPO_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

# Where each kind of folder goes by default: the viewer reads packs from ``features`` (scan ``OWNER/NAME``); graphs
# and per-feature JSON (which the viewer reads only from a local ``./data/<dir>``) stay out of that folder.
DEFAULT_PATHS = {"pack": "features", "json": "feature-json", "graphs": "graphs"}
_KIND_NAMES = {"pack": "a feature pack", "json": "a per-feature JSON folder", "graphs": "a graph folder"}


@dataclass
class UploadPlan:
    directory: Path
    repo: str
    path_in_repo: str
    revision: str
    kind: str  # pack | json | graphs
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (local relative path, repo path, bytes)
    path_inferred: bool = False  # path_in_repo is the default for this kind of folder

    @property
    def total_bytes(self) -> int:
        return sum(size for _, _, size in self.files)

    def scan(self) -> str | None:
        """The string the viewer and ``attribute --scan`` take, or None when the viewer cannot reach the pack."""
        if self.kind != "pack":
            return None
        parts = PurePosixPath(self.path_in_repo).parts
        if not parts or parts[-1] != "features":
            return None
        sub = "/".join(parts[:-1])
        return self.repo + (f"//{sub}" if sub else "") + ("" if self.revision == "main" else f"@{self.revision}")

    def lines(self) -> list[str]:
        """Human-readable listing for --dry-run (what would go where)."""
        base = f"https://huggingface.co/{self.repo}/blob/{self.revision}/"
        out = [f"{local} -> {base}{remote} ({size} bytes)" for local, remote, size in self.files]
        out.append(f"{len(self.files)} files, {self.total_bytes} bytes, {self.kind} from {self.directory}")
        how = "the default for" if self.path_inferred else "chosen with --path-in-repo for"
        out.append(f"path in repo: {self.path_in_repo or '(repo root)'} ({how} {_KIND_NAMES.get(self.kind, self.kind)})")
        scan = self.scan()
        if scan:
            out.append(f"scan: {scan}")
        elif self.kind == "pack":
            out.append("note: the viewer reads packs only from a path ending in 'features'; no scan string reaches this one")
        elif PurePosixPath(self.path_in_repo).name == "features":
            out.append(f"note: {self.path_in_repo} is where the viewer looks for a feature pack; "
                       f"{_KIND_NAMES.get(self.kind, self.kind)} there hides any pack")
        if self.kind == "json":
            out.append("note: the viewer reads per-feature JSON only from a local ./data/<dir>; upload a pack "
                       "(featurestore export pack) for the viewer to read features from the Hub")
        return out


def _check_repo_id(repo: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or not all(set(part) <= _REPO_ID_CHARS for part in parts):
        raise UserError(f"--repo must look like OWNER/NAME, got {repo!r}")


def plan_upload(directory: str | os.PathLike, repo: str, *, path_in_repo: str | None = None,
                revision: str | None = None, workers: int | None = None) -> UploadPlan:
    """Verify ``directory`` and list where each file would go; refuses a directory that verify rejects.
    ``path_in_repo`` None: the default for the kind of folder verify found (``DEFAULT_PATHS``)."""
    directory = Path(directory)
    _check_repo_id(repo)
    report = verify(directory, workers=workers)
    if not report.ok:
        raise UserError(f"{directory} fails verification ({len(report.problems)} problems, first: {report.problems[0]}); "
                        f"see `featurestore export verify {directory}`")
    inferred = path_in_repo is None
    if inferred:
        path_in_repo = DEFAULT_PATHS.get(report.kind, "features")
    prefix = path_in_repo.strip("/")
    if ".." in PurePosixPath(prefix).parts:
        raise UserError(f"--path-in-repo must not contain '..': {path_in_repo!r}")
    plan = UploadPlan(directory, repo, prefix, revision or "main", report.kind, path_inferred=inferred)
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in PurePosixPath(relative).parts):
            plan.files.append((relative, f"{prefix}/{relative}" if prefix else relative, path.stat().st_size))
    return plan


def _token() -> str:
    token = os.environ.get("HF_TOKEN")
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    return token


def staging_folder(plan: UploadPlan) -> Path:
    """A per-(directory, repo, revision, path) folder of symlinks laid out as in the repo; kept for resume."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featurestore" / "uploads"
    key = "\n".join([str(plan.directory.resolve()), plan.repo, plan.revision, plan.path_in_repo])
    root = cache / hashlib.sha256(key.encode()).hexdigest()[:16]
    wanted = {remote: plan.directory.resolve() / local for local, remote, _ in plan.files}
    for link in [p for p in root.rglob("*") if p.is_symlink()] if root.exists() else []:
        if link.relative_to(root).as_posix() not in wanted:
            link.unlink()
    for remote, target in wanted.items():
        link = root / remote
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return root


def upload(directory: str | os.PathLike, repo: str, *, path_in_repo: str | None = None, revision: str | None = None,
           private: bool = False, dry_run: bool = False, workers: int | None = None, api=None) -> UploadPlan:
    """Upload after verification. ``dry_run`` only plans (no token, no network). ``api`` defaults to ``HfApi``."""
    plan = plan_upload(directory, repo, path_in_repo=path_in_repo, revision=revision, workers=workers)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=_token())
    try:
        api.create_repo(repo, repo_type="model", private=True if private else None, exist_ok=True)
        if plan.revision != "main":
            api.create_branch(repo, branch=plan.revision, repo_type="model", exist_ok=True)
        api.upload_large_folder(repo_id=repo, folder_path=staging_folder(plan), repo_type="model",
                                revision=plan.revision, private=True if private else None)
    except UserError:
        raise
    except Exception as exc:  # network and Hub errors: one line, never the token
        raise UserError(f"upload to {repo} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return plan
