"""Fetching, staging and verifying model weights on the controller (what to ship: `vilms.config.weights`)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from vilms.config.model import Config
from vilms.config.weights import (  # noqa: F401  (re-exported: callers use one module for weights)
    CONTAINER_ROOT,
    Fetched,
    FileEntry,
    MANIFEST_NAME,
    MODELS_DIR_ENV,
    WeightSpec,
    WeightsError,
    _CHUNK,
    _REPO_ID,
    _raw_entry,
    _shipped_routes,
    by_model,
    has_local_models,
    runtime_source,
    slugify,
    spec_for,
    weights_for,
)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def matches(path: str, patterns: Iterable[str]) -> bool:
    patterns = list(patterns)
    return not patterns or any(fnmatch.fnmatch(path, p) for p in patterns)


def verify(directory: str | os.PathLike[str], files: Iterable[FileEntry]) -> list[str]:
    """Problems with `directory` against a manifest: one line per missing file, wrong size or wrong sha256."""
    problems = []
    root = Path(directory)
    for entry in files:
        target = root / entry.path
        if not target.is_file():
            problems.append(f"{entry.path}: missing")
        elif (size := target.stat().st_size) != entry.size:
            problems.append(f"{entry.path}: size {size}, expected {entry.size}")
        elif (digest := sha256_file(target)) != entry.sha256:
            problems.append(f"{entry.path}: sha256 {digest[:12]}…, expected {entry.sha256[:12]}…")
    return problems


def read_manifest(path: str | os.PathLike[str]) -> list[FileEntry]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [FileEntry(**f) for f in (data["files"] if isinstance(data, dict) else data)]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# --- controller fetch --------------------------------------------------------------------------------------------

def fetch(spec: WeightSpec, cache: str | os.PathLike[str], *, token: str | None = None,
          endpoint: str | None = None) -> Fetched:
    """Bring one model into the controller cache (once) and stage exactly its manifest's files for shipping."""
    cache = Path(cache)
    if spec.local_dir:
        root, commit, files = _from_local_dir(spec, cache)
    else:
        root, commit, files = _from_hub(spec, cache, token=token, endpoint=endpoint)
    staged = _stage(cache / "ship" / spec.slug, root, files)
    return Fetched(spec=spec, commit=commit, staged=str(staged), files=files)


def _from_hub(spec: WeightSpec, cache: Path, *, token: str | None, endpoint: str | None
              ) -> tuple[Path, str, list[FileEntry]]:
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(spec.repo, revision=spec.revision, cache_dir=cache / "hub",
                                          allow_patterns=list(spec.allow_patterns) or None, token=token or None,
                                          endpoint=endpoint))
    except Exception as exc:  # the hub's own error names the cause (gated, not found, offline)
        hint = " (gated or private: set vilms_stack_hf_token from Vault)" if "401" in str(exc) or "403" in str(exc) \
            or "Gated" in type(exc).__name__ else ""
        raise WeightsError(f"{spec.model}: cannot fetch {spec.source}: {type(exc).__name__}: {exc}{hint}") from exc
    commit = snapshot.name
    manifest_path = cache / "manifests" / spec.slug / f"{commit}.json"
    if manifest_path.is_file():
        files = read_manifest(manifest_path)
        if all((snapshot / f.path).is_file() and (snapshot / f.path).stat().st_size == f.size for f in files):
            return snapshot, commit, files
    files = _hub_manifest(spec, snapshot, commit, token=token, endpoint=endpoint)
    _write_json(manifest_path, {"source": spec.source, "commit": commit, "files": [asdict(f) for f in files]})
    return snapshot, commit, files


def _hub_manifest(spec: WeightSpec, snapshot: Path, commit: str, *, token: str | None, endpoint: str | None
                  ) -> list[FileEntry]:
    """Manifest from the hub's file list (LFS sha256 + sizes), each file checked as it lies in the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    try:
        tree = {f.path: f for f in HfApi(endpoint=endpoint, token=token or None)
                .list_repo_tree(spec.repo, revision=commit, recursive=True) if isinstance(f, RepoFile)}
    except Exception:  # offline site with a pre-filled cache: every hash is computed here
        tree = None
    names = tree.keys() if tree is not None else _walk(snapshot)
    files = []
    for name in sorted(filter_repo_objects(names, allow_patterns=list(spec.allow_patterns) or None)):
        local = snapshot / name
        if not local.is_file():
            raise WeightsError(f"{spec.model}: {name} is listed by the hub but missing from the cache {snapshot}")
        size, digest = local.stat().st_size, sha256_file(local)
        remote = tree.get(name) if tree is not None else None
        lfs = getattr(remote, "lfs", None)
        expected_size = lfs.size if lfs else getattr(remote, "size", size)
        if size != expected_size or (lfs and digest != lfs.sha256):
            raise WeightsError(f"{spec.model}: {name} in the controller cache does not match the hub "
                               f"(size {size} vs {expected_size}); delete {local} and fetch again")
        files.append(FileEntry(name, size, digest, "hub-lfs" if lfs else "computed"))
    return files


def _walk(root: Path) -> list[str]:
    """Relative paths of regular files under `root`, skipping hidden entries (.cache, .git)."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            found.append(rel)
    return sorted(found)


def _from_local_dir(spec: WeightSpec, cache: Path) -> tuple[Path, str, list[FileEntry]]:
    """A controller directory: hashes computed here, reused while a file's size and mtime are unchanged."""
    root = Path(spec.local_dir or "")
    if not root.is_dir():
        raise WeightsError(f"{spec.model}: local-dir {root} is not a directory on the controller")
    memo_path = cache / "manifests" / spec.slug / "local.json"
    memo = json.loads(memo_path.read_text(encoding="utf-8")) if memo_path.is_file() else {}
    files, new_memo = [], {}
    for name in _walk(root):
        if not matches(name, spec.allow_patterns):
            continue
        stat = (root / name).stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest = memo.get(name, {}).get(key) or sha256_file(root / name)
        new_memo[name] = {key: digest}
        files.append(FileEntry(name, stat.st_size, digest, "computed"))
    if not files:
        raise WeightsError(f"{spec.model}: no file in {root} matches {list(spec.allow_patterns)}")
    _write_json(memo_path, new_memo)
    commit = "local-" + hashlib.sha256(json.dumps([asdict(f) for f in files]).encode()).hexdigest()[:16]
    return root, commit, files


def _stage(staged: Path, root: Path, files: list[FileEntry]) -> Path:
    """`staged` = symlinks to exactly the manifest's files (rsync -L ships their contents; extras never travel)."""
    wanted = {f.path: (root / f.path).resolve() for f in files}
    if staged.is_dir():
        for path in sorted(staged.rglob("*"), reverse=True):
            rel = path.relative_to(staged).as_posix()
            if path.is_symlink() or path.is_file():
                if rel not in wanted or path.resolve() != wanted[rel]:
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for rel, target in wanted.items():
        link = staged / rel
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
    return staged


def from_plan(entries: Iterable[dict[str, Any]]) -> list[WeightSpec]:
    """WeightSpecs back from plan.json's "weights" (what `vilms render` wrote)."""
    return [WeightSpec(**{**e, "allow_patterns": tuple(e.get("allow_patterns") or ())}) for e in entries]


def fetch_specs(specs: Iterable[WeightSpec], cache: str | os.PathLike[str], *, token: str | None = None,
                endpoint: str | None = None) -> list[Fetched]:
    """Each distinct source once (two models may share weights)."""
    done: dict[str, Fetched] = {}
    result = []
    for spec in specs:
        if spec.slug not in done:
            done[spec.slug] = fetch(spec, cache, token=token, endpoint=endpoint)
        first = done[spec.slug]
        result.append(Fetched(spec=spec, commit=first.commit, staged=first.staged, files=first.files))
    return result


def fetch_all(config: Config, cache: str | os.PathLike[str], *, token: str | None = None,
              endpoint: str | None = None) -> list[Fetched]:
    return fetch_specs(weights_for(config), cache, token=token, endpoint=endpoint)
