"""`host.cuda-version` (a seed key): the host driver's CUDA line, which picks the CUDA build of the vLLM image.

Why this meaning: vLLM publishes each release on Docker Hub as `vllm/vllm-openai:<tag>`, built for CUDA 13.0
since vLLM 0.20, and as `<tag>-cu129`, built for CUDA 12.9. A driver whose CUDA is 12.x cannot start a CUDA 13
image, so on such a host the default `latest` deploys an engine that dies at start-up; `latest-cu129` is the
image that runs there. On a Jetson the L4T release decides the Ollama image, so the key changes nothing there.

An explicit `docker.tag.vllm` (or a tag inside `docker.image.vllm`) is used as written: the hint only fills the
default. The one table of CUDA line -> tag suffix lives here; compose reads it through `vllm_default_tag`.
"""

from __future__ import annotations

from vilms.config.model import Config
from vilms.config.schema import ConfigIssue

VLLM_REPO = "vllm/vllm-openai"
DEFAULT_TAG = "latest"
POINTER = "/host/cuda-version"
# A host whose driver's CUDA line is 12 gets vLLM's CUDA 12.9 build; 13 and later the plain tag (CUDA 13.0).
CUDA12, CUDA12_SUFFIX, CUDA12_BUILT_FOR = 12, "-cu129", (12, 9)


def cuda_version(config: Config) -> tuple[int, int] | None:
    """(major, minor) of host.cuda-version, None when unset. A YAML number (12.6) reads like the string "12.6"."""
    value = config.raw["host"].get("cuda-version")
    if value is None:
        return None
    major, _, rest = str(value).partition(".")
    return int(major), int(rest.partition(".")[0] or 0)


def _is_vllm_repo(repo: str) -> bool:
    """vLLM's own repository, also behind a registry prefix (a site mirror keeps the repo path)."""
    return repo == VLLM_REPO or repo.endswith("/" + VLLM_REPO)


def _pinned(config: Config) -> str | None:
    """The vLLM tag the operator wrote (docker.tag.vllm, or a tag/digest inside docker.image.vllm), else None."""
    docker = config.docker
    repo = docker["image"]["vllm"]
    if "@" in repo or ":" in repo.rsplit("/", 1)[-1]:
        return repo.rsplit("/", 1)[-1]
    return docker["tag"].get("vllm") or None


def vllm_default_tag(config: Config) -> str:
    """Tag of the vLLM image when the config pins none: `latest`, or `latest-cu129` on a dgpu host with CUDA 12."""
    version = cuda_version(config)
    if version is None or config.platform != "dgpu" or not _is_vllm_repo(config.docker["image"]["vllm"]):
        return DEFAULT_TAG
    return DEFAULT_TAG + CUDA12_SUFFIX if version[0] == CUDA12 else DEFAULT_TAG


def cuda_issues(config: Config, runs_vllm: bool) -> list[ConfigIssue]:
    """What host.cuda-version does for this config, said where it does less than a reader might expect.

    `runs_vllm`: the stack runs at least one vLLM container (routing's stack services), so the image tag matters.
    """
    version = cuda_version(config)
    if version is None:
        return []
    if config.platform != "dgpu":
        return [_warn("host.cuda-version has no effect on a Jetson (platform js): the Ollama image tag follows the "
                      "board's L4T release", "remove it, or set docker.tag.engine to pin the engine image")]
    if not runs_vllm:
        return [_warn("host.cuda-version only picks the vLLM image tag, and this stack runs no vLLM container",
                      "remove it, or keep it for when a vLLM model is added")]
    return _vllm_issues(config, version)


def _vllm_issues(config: Config, version: tuple[int, int]) -> list[ConfigIssue]:
    pinned, repo = _pinned(config), config.docker["image"]["vllm"]
    shown = ".".join(map(str, version))
    if pinned is not None:
        if version[0] == CUDA12 and "-cu12" not in pinned:
            return [_warn(f"the vLLM image tag is pinned ({pinned}); host.cuda-version {shown} does not change it",
                          f"on a CUDA 12 driver use a CUDA 12 build, e.g. <release>{CUDA12_SUFFIX} (vLLM 0.20 and later)")]
        return []
    if version[0] < CUDA12:
        return [ConfigIssue(POINTER, f"vLLM publishes no image for CUDA {shown}: its images need a CUDA 12 or 13 driver",
                            "update the NVIDIA driver, or pin docker.tag.vllm to an image built for this CUDA")]
    if not _is_vllm_repo(repo):
        return [_warn(f"host.cuda-version picks tags of {VLLM_REPO} only; docker.image.vllm is {repo!r}, whose tag "
                      f"stays {DEFAULT_TAG!r}", "pin docker.tag.vllm to the build of that image for this CUDA")]
    if version[0] == CUDA12 and version < CUDA12_BUILT_FOR:
        return [_warn(f"vLLM's CUDA 12 images are built for 12.9; on a {shown} driver "
                      f"{VLLM_REPO}:{vllm_default_tag(config)} starts only through CUDA minor-version compatibility",
                      "update the driver to CUDA 12.9 or later if the engine fails to start, or pin docker.tag.vllm")]
    return []


def _warn(message: str, hint: str) -> ConfigIssue:
    return ConfigIssue(POINTER, message, hint, severity="warning")
