"""A stand-in for the Hugging Face Hub's file API, served from a local directory (no internet here).

huggingface_hub talks to it through HF_ENDPOINT=http://127.0.0.1:PORT exactly as it talks to huggingface.co:
  GET  /api/models/{org}/{name}[/revision/{rev}]          model info: id, sha (the commit), siblings
  GET  /api/models/{org}/{name}/tree/{rev}[/{path}]       file list: size, git oid, lfs {oid = sha256, size}
  HEAD|GET /{org}/{name}/resolve/{rev}/{path}              the file, with X-Repo-Commit, ETag (git oid) or
                                                          X-Linked-Etag/X-Linked-Size (LFS sha256), Range support
Layout: ROOT/{org}/{name}/... are the repo's files at one commit (its sha is derived from the file list, so editing
a file makes a new commit). A file ROOT/{org}/{name}.gated holding one token per line makes the repo gated: its
files answer 401 GatedRepo without `Authorization: Bearer <token>`. *.safetensors, *.gguf, *.bin and files over
10 MB are LFS files, as on the hub.

    python -m devkit.hub_standin serve ROOT [--port 0]        # prints the endpoint URL
    python -m devkit.hub_standin publish-tiny ROOT org/name     # a tiny random-weight safetensors model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
LFS_MIN_SIZE = 10 * 1024 * 1024
_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
_ROUTES = [
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


def _git_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=256)
def _entry(path: Path, size: int, mtime_ns: int) -> dict:
    """One file as the hub's tree API lists it (cached while size and mtime hold)."""
    is_lfs = path.suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE
    entry = {"type": "file", "size": size, "oid": _git_oid(path) if not is_lfs else _sha256(path)[:40]}
    if is_lfs:
        entry["lfs"] = {"oid": _sha256(path), "size": size, "pointerSize": 134}
    return entry


class Repo:
    def __init__(self, root: Path, repo_id: str):
        self.id = repo_id
        self.dir = root / repo_id

    def files(self) -> dict[str, dict]:
        out = {}
        for path in sorted(self.dir.rglob("*")):
            rel = path.relative_to(self.dir).as_posix()
            if path.is_file() and not rel.startswith("."):
                stat = path.stat()
                out[rel] = {**_entry(path, stat.st_size, stat.st_mtime_ns), "path": rel}
        return out

    def commit(self, files: dict[str, dict]) -> str:
        return hashlib.sha1(json.dumps([[p, f["oid"]] for p, f in files.items()]).encode()).hexdigest()

    def tokens(self) -> set[str] | None:
        marker = self.dir.parent / f"{self.dir.name}.gated"
        return set(marker.read_text().split()) if marker.is_file() else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, fmt: str, *args) -> None:  # quiet: tests read `requests` instead
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        for kind, pattern in _ROUTES:
            match = pattern.match(path)
            if match:
                return self._serve(kind, match.groupdict(), body)
        self._error(404, "EntryNotFound", f"no route {path}")

    def _serve(self, kind: str, params: dict, body: bool) -> None:
        repo = Repo(self.root, params["repo"])
        if not repo.dir.is_dir():
            return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        files = repo.files()
        commit = repo.commit(files)
        rev = params.get("rev") or "main"
        if rev not in ("main", commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", commit)
        if kind == "info":
            return self._json({"id": repo.id, "modelId": repo.id, "sha": commit, "private": False,
                               "gated": "manual" if repo.tokens() is not None else False,
                               "siblings": [{"rfilename": p} for p in files]}, commit, body)
        if kind == "tree":
            return self._json(self._tree(files, params.get("path")), commit, body)
        tokens = repo.tokens()
        auth = self.headers.get("Authorization", "")
        if tokens is not None and auth.removeprefix("Bearer ") not in tokens:
            return self._error(401, "GatedRepo", f"Access to model {repo.id} is restricted. You must have access "
                                                 "to it and be authenticated to access it.", commit)
        entry = files.get(params["path"])
        if entry is None:
            return self._error(404, "EntryNotFound", f"{params['path']} does not exist", commit)
        self._file(repo.dir / params["path"], entry, commit, body)

    def _tree(self, files: dict[str, dict], prefix: str | None) -> list[dict]:
        wanted = [f for p, f in files.items() if not prefix or p.startswith(prefix.rstrip("/") + "/")]
        dirs = sorted({"/".join(f["path"].split("/")[:i]) for f in wanted for i in range(1, f["path"].count("/") + 1)})
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs] + wanted

    def _file(self, path: Path, entry: dict, commit: str, body: bool) -> None:
        size = entry["size"]
        start, end, status = 0, size - 1, 200
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if match and size:
            start, end, status = int(match[1]), min(int(match[2] or size - 1), size - 1), 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{entry["oid"]}"')
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(max(end - start + 1, 0)))
        self.end_headers()
        if body:
            with open(path, "rb") as fh:
                fh.seek(start)
                remaining = end - start + 1
                while remaining > 0 and (chunk := fh.read(min(remaining, 1 << 20))):
                    self.wfile.write(chunk)
                    remaining -= len(chunk)

    def _json(self, data, commit: str, body: bool) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


class HubStandin:
    """The stand-in on a loopback port, in a thread: `with HubStandin(root) as hub: hub.url`."""

    def __init__(self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0):
        handler = type("BoundHandler", (Handler,), {"root": Path(root)})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.server.requests = []  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.server.requests  # type: ignore[attr-defined]

    def __enter__(self) -> "HubStandin":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def publish_tiny(root: str | os.PathLike[str], repo_id: str, seed: int = 0, hidden: int = 64) -> Path:
    """A tiny random-weight Llama-shaped repo: config.json, model.safetensors, tokenizer_config.json, README.md.

    Engines here are stand-ins, so the weights only need the shape and the file kinds of a real repo.
    """
    import numpy as np
    from safetensors.numpy import save_file

    target = Path(root) / repo_id
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((256, hidden), dtype=np.float32),
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((hidden * 2, hidden), dtype=np.float32),
               "lm_head.weight": rng.standard_normal((256, hidden), dtype=np.float32)}
    save_file(tensors, str(target / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": 1, "vocab_size": 256, "torch_dtype": "float32"}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (target / "README.md").write_text(f"# {repo_id}\nRandom weights for tests (seed {seed}).\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("root")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    tiny = sub.add_parser("publish-tiny")
    tiny.add_argument("root")
    tiny.add_argument("repo")
    args = parser.parse_args()
    if args.cmd == "publish-tiny":
        print(publish_tiny(args.root, args.repo))
        return
    hub = HubStandin(args.root, args.host, args.port)
    print(hub.url, flush=True)
    hub.server.serve_forever()


if __name__ == "__main__":
    main()
