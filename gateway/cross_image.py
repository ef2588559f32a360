"""Build the gateway image for another architecture (linux/arm64 for Jetsons) on any controller, no emulation needed.

`docker buildx build --platform linux/arm64` (see the Dockerfile) needs BuildKit, QEMU and a registry for the base
image; an air-gapped amd64 controller often has none of them. This builds the same image from parts that need no
arm64 code to run at build time:
  1. a Debian bookworm arm64 root: `debootstrap --foreign` downloads and unpacks the base system, and every other
     package it fetched is unpacked with `dpkg-deb -x` (nothing is configured, so nothing executes);
  2. the gateway and its dependencies installed by this machine's pip into `/opt/vilms/site`, from wheels built for
     `manylinux*_aarch64` (`pip download --platform ...`), without the controller-only deploy wing;
  3. one layer and an image config that says `architecture: arm64`, written as a `docker save` archive: what the
     role ships (`vilms_stack_image_archives`) or `docker load`s into a site registry.
`vilms image platform ARCHIVE --machine aarch64` reads that architecture back and refuses an archive that does not
match the host, naming both (the roles do not call it yet). Run as root (device nodes and owners in the root file system): `make image-arm64`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHES = {"arm64": ("aarch64", "v8"), "amd64": ("x86_64", "")}
MIRROR = os.environ.get("VILMS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = "python3,ca-certificates,libgomp1"
SKIP = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/", "var/cache/apt/",
        "var/lib/apt/lists/")  # not needed to run, a quarter of the base root
USER_LINES = {"etc/passwd": "vilms:x:10001:10001::/nonexistent:/usr/sbin/nologin\n", "etc/group": "vilms:x:10001:\n"}
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH=/opt/vilms/site",
       "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
LAUNCHER = "#!/usr/bin/python3\nimport sys\nfrom vilms.cli import main\nsys.exit(main())\n"


def run(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def base_root(arch: str, cache: Path) -> Path:
    """An unpacked (not configured) bookworm root for `arch`, cached as a directory."""
    root = cache / f"rootfs-bookworm-{arch}"
    if (root / ".vilms-complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    run("debootstrap", "--foreign", f"--arch={arch}", "--variant=minbase", f"--include={BASE_PACKAGES}",
        "bookworm", str(root), MIRROR, stdout=subprocess.DEVNULL)
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    print(f"+ dpkg-deb -x each of {len(debs)} packages into {root}", file=sys.stderr)
    for deb in debs:  # stage 2's unpacking, without executing anything
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        deb.unlink()
    shutil.copyfile(root / "usr/share/base-passwd/passwd.master", root / "etc/passwd")
    shutil.copyfile(root / "usr/share/base-passwd/group.master", root / "etc/group")
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    (root / ".vilms-complete").touch()
    return root


def platform_args(arch: str) -> list[str]:
    machine = ARCHES[arch][0]
    tags = ["manylinux_2_36", "manylinux_2_34", "manylinux_2_28", "manylinux_2_17", "manylinux2014"]
    return [a for t in tags for a in ("--platform", f"{t}_{machine}")] + [
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:"]


def site_packages(arch: str, cache: Path, stage: Path, extra_pip: list[str]) -> None:
    """The gateway and its dependencies for `arch`, installed by this machine's pip (nothing runs for `arch`)."""
    wheels = cache / f"wheels-{arch}"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("vilms-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", ".cache", "tests", "bench",
                                                                  "molecule", "__pycache__", "deploy"))
        run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src))
    wheel = str(next(wheels.glob("vilms-*.whl")))  # by path: never a same-named package from an index
    pip = [sys.executable, "-m", "pip"]
    run(*pip, "download", "-q", *extra_pip, *platform_args(arch), "-d", str(wheels), wheel)
    run(*pip, "install", "-q", "--no-index", "--find-links", str(wheels), *platform_args(arch),
        "--target", str(stage / "opt/vilms/site"), wheel)
    shutil.rmtree(stage / "opt/vilms/site/bin", ignore_errors=True)  # console scripts name this machine's Python


def layer(root: Path, stage: Path, out: Path) -> str:
    """One layer: the base root, then /opt/vilms, the launcher and the vilms user. Returns its sha256 (diff id)."""
    digest = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            digest.update(b)
            return self.fh.write(b)

    with out.open("wb") as raw, tarfile.open(fileobj=Hashing(raw), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if rel == ".vilms-complete" or rel in USER_LINES or (rel + "/").startswith(SKIP):
                continue
            tar.add(path, arcname=rel, recursive=False)
        for rel, line in USER_LINES.items():
            data = (root / rel).read_bytes() + line.encode()
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for path in sorted(stage.rglob("*")):
            tar.add(path, arcname=path.relative_to(stage).as_posix(), recursive=False,
                    filter=lambda i: (setattr(i, "uid", 0), setattr(i, "gid", 0), i)[-1])
        data = LAUNCHER.encode()
        info = tarfile.TarInfo("usr/local/bin/vilms")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return "sha256:" + digest.hexdigest()


def archive(layer_tar: Path, diff_id: str, arch: str, tag: str, out: Path) -> None:
    """A `docker save` archive of one layer whose image config names `arch`."""
    config = {"architecture": arch, "os": "linux", **({"variant": ARCHES[arch][1]} if ARCHES[arch][1] else {}),
              "config": {"User": "10001:10001", "Env": ENV, "ExposedPorts": {"8989/tcp": {}},
                         "Cmd": ["vilms", "serve", "--config", "/etc/vilms/config.yaml"]},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created_by": "gateway/cross_image.py (debootstrap --foreign + pip --platform)"}]}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":")[1] + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]).encode()
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((config_name, config_bytes), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(layer_tar, arcname=layer_name)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="arm64")
    parser.add_argument("--tag", default="vilms/gateway:0.1.0")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "images" / "gateway-arm64.tar")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "cross")
    parser.add_argument("--pip-arg", action="append", default=[], help="passed to pip download (e.g. an index URL)")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    root = base_root(args.arch, args.cache)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        stage = Path(tmp) / "stage"
        site_packages(args.arch, args.cache, stage, args.pip_arg)
        layer_tar = Path(tmp) / "layer.tar"
        diff_id = layer(root, stage, layer_tar)
        archive(layer_tar, diff_id, args.arch, args.tag, args.out)
    print(json.dumps({"archive": str(args.out), "tag": args.tag, "architecture": args.arch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
