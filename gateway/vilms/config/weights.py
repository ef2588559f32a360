"""Model weights that vilms ships to hosts: which, from where, to where, and how to prove they arrived intact.

Every vLLM model compose runs and every local embedding/reranker model gets a WeightSpec: a source (a Hugging Face
repo id + optional revision, or a directory on the controller), a host directory under `docker.models-dir` and the
path engines see, `/models/<slug>`. The controller fetches each source once into a cache (the real
`huggingface_hub.snapshot_download`, allow-patterns, optional token), writes a manifest (path, size, sha256 —
the hub's LFS sha256 where it has one, otherwise computed and checked against the hub's size) and stages the files
for rsync. Hosts then never talk to the hub: the role ships the staged files and checks them against the manifest.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from vilms.config.model import Config, ModelSpec
from vilms.config.routing import GATEWAY_SERVICE, Router, stack_services

CONTAINER_ROOT = "/models"
MODELS_DIR_ENV = "VILMS_MODELS_DIR"  # set by compose in the gateway: where shipped embedding weights are mounted
MANIFEST_NAME = ".vilms-weights.json"  # written on the host next to verified weights; marks dirs vilms may prune
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 8 * 1024 * 1024


class WeightsError(Exception):
    """A model's weights cannot be fetched or do not match their manifest; the message names the model."""


@dataclass(frozen=True)
class WeightSpec:
    """One model's weights as the plan ships them."""

    model: str                      # the served name (unchanged: --served-model-name / the embeddings name)
    service: str                    # the compose service that mounts them ("gateway" for local embeddings)
    slug: str
    host_dir: str                   # docker.models-dir/<slug>; relative = under the stack directory
    container_path: str             # /models/<slug>
    repo: str | None = None
    revision: str | None = None
    local_dir: str | None = None    # controller directory (air-gapped sites)
    allow_patterns: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return self.local_dir or f"{self.repo}@{self.revision or 'main'}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["allow_patterns"] = list(self.allow_patterns)
        return data


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    origin: str = "computed"        # "hub-lfs" = the hub's own sha256; "computed" = hashed here


@dataclass
class Fetched:
    """A spec fetched into the controller cache: a directory of exactly the manifest's files."""

    spec: WeightSpec
    commit: str
    staged: str
    files: list[FileEntry] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {**self.spec.as_dict(), "commit": self.commit, "staged": self.staged, "bytes": self.total_bytes,
                "files": [asdict(f) for f in self.files]}


# --- which models, from where ------------------------------------------------------------------------------------

def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.") or "model"


def _raw_entry(config: Config, spec: ModelSpec) -> dict[str, Any]:
    """The model's own config mapping (its `weights` block lives there), found through its JSON pointer."""
    if spec.pointer == "/embedding":
        return config.embedding
    index = int(spec.pointer.rsplit("/", 1)[-1])
    return config.serving["models"][index]


def _shipped_routes(config: Config) -> Iterable[tuple[ModelSpec, str]]:
    """(spec, service) for every model whose files live on the host: compose-run vLLM and in-gateway embeddings."""
    for svc in stack_services(config):
        if svc.kind == "vllm" and svc.spec is not None:
            yield svc.spec, svc.name
    for route in Router(config).routes.values():
        if route.engine == "local":
            yield route.spec, GATEWAY_SERVICE


def spec_for(config: Config, spec: ModelSpec, service: str) -> WeightSpec | None:
    """The model's WeightSpec, or None when the operator provides its files (absolute path, ship: false)."""
    weights = _raw_entry(config, spec).get("weights") or {}
    if not weights.get("ship", True):
        return None
    repo, local_dir = weights.get("repo"), weights.get("local-dir")
    if not repo and not local_dir:
        candidate = spec.path or spec.name
        if not _REPO_ID.match(candidate):
            return None  # an absolute or relative path, or a bare name: not something vilms can fetch
        repo = candidate
    revision = weights.get("revision")
    slug = slugify(repo) if repo else slugify(spec.name)
    if repo and revision:
        slug = f"{slug}--{slugify(revision)[:40]}"
    models_dir = str(config.docker["models-dir"]).rstrip("/") or "/"
    return WeightSpec(model=spec.name, service=service, slug=slug, host_dir=f"{models_dir}/{slug}",
                      container_path=f"{CONTAINER_ROOT}/{slug}", repo=None if local_dir else repo,
                      revision=None if local_dir else revision, local_dir=local_dir,
                      allow_patterns=tuple(weights.get("allow-patterns") or ()))


def weights_for(config: Config) -> list[WeightSpec]:
    """Every model whose weights vilms ships, in routing order (C3: plan.json "weights")."""
    found = (spec_for(config, spec, service) for spec, service in _shipped_routes(config))
    return [w for w in found if w is not None]


def by_model(config: Config) -> dict[str, WeightSpec]:
    return {w.model: w for w in weights_for(config)}


def runtime_source(config: Config, spec: ModelSpec) -> str:
    """What a local embedder loads: the shipped copy inside the container when compose mounted one, else as written.

    Compose sets VILMS_MODELS_DIR in the gateway only when it mounts shipped weights, so `vilms serve` on a dev box
    keeps loading `path` or the hub name as before.
    """
    root = os.environ.get(MODELS_DIR_ENV)
    shipped = by_model(config).get(spec.name) if root else None
    if shipped is not None:
        return f"{root.rstrip('/')}/{shipped.slug}"
    return spec.path or spec.name


def has_local_models(config: Config) -> bool:
    """True when the gateway itself runs a model (embedding/reranker): it needs the embeddings image variant."""
    return any(service == "gateway" for _, service in _shipped_routes(config))


# --- manifests ---------------------------------------------------------------------------------------------------
