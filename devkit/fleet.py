"""A simulated fleet of edge boxes for `make fleet-up / fleet-rollout / fleet-down` (and tests/test_fleet.py).

Each box is one of the molecule rig's Docker-in-Docker hosts (the rig's Debian base image, privileged, its own
dockerd), half of them dgpu servers and half Jetsons. What makes a box look like a GPU server or a Jetson is not
restated here: the boxes are prepared by molecule/resources/prepare.yml and their group variables are read from
molecule/<scenario>/molecule.yml, so the fleet and the molecule scenarios cannot drift apart.

The fleet writes a normal inventory directory (hosts.yml, group_vars/, host_vars/) that an operator or a test
edits like any other, and rolls out to it with the real site.yml. Optionally a site registry (Debian's
`docker-registry` binary, run in a container on the fleet's network) serves the images instead of per-host
archives, so an update moves only the layers that changed.

    python -m devkit.fleet up --n 20 [--registry]
    python -m devkit.fleet rollout [-- extra ansible-playbook args]
    python -m devkit.fleet down
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import yaml

from devkit.rig_image import BASE_IMAGE

ROOT = Path(__file__).resolve().parents[1]
# Edge boxes come flashed with Docker (JetPack images include it) and, like every Ubuntu/JetPack install, python3-apt
# (Mitogen cannot run the apt module's own install of it): the rig's base image plus Debian's docker.io,
# so a fleet rollout spends its time on the stack, not on twenty identical apt downloads. The docker_engine role
# still runs on every rollout (and finds the packages there).
BOX_IMAGE = "vilms-rig/fleet-box:" + BASE_IMAGE.rsplit(":", 1)[1] + "-2"  # rebuilt when the base changes
BOX_DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      docker.io python3-requests python3-apt >/dev/null && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
"""
REGISTRY_BINARY = Path("/usr/bin/docker-registry")  # Debian's docker-registry package
REGISTRY_PORT = 5000
# The boxes run the light gateway image: the local MiniLM embedder (1.3 GB image) is the molecule dgpu
# scenario's job; twenty copies of it would not fit a laptop.
RIG_GATEWAY = "vilms/gateway:rig"
SCENARIOS = {"dgpu": "dgpu", "jetsons": "jetson"}
VAULT_PASSWORD = ROOT / "molecule" / "resources" / "vault-password"


@dataclass(frozen=True)
class Fleet:
    """Names and paths of one simulated fleet; everything it creates carries `prefix`."""

    prefix: str = "vilms-fleet"
    state_root: Path = field(default_factory=lambda: ROOT / ".cache" / "fleet")

    @property
    def state(self) -> Path:
        return self.state_root / self.prefix

    @property
    def inventory(self) -> Path:
        return self.state / "inventory"

    @property
    def reports(self) -> Path:
        return self.state / "reports"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def registry(self) -> str:
        return f"{self.prefix}-registry"

    @property
    def label(self) -> dict[str, str]:
        return {"vilms-fleet": self.prefix}

    def host_names(self, n: int) -> list[tuple[str, str]]:
        """(name, group) for n boxes: dgpu and Jetson alternating, dgpu first (so batch 1 is a dgpu box)."""
        out = []
        for i in range(n):
            group = "dgpu" if i % 2 == 0 else "jetsons"
            kind = "dgpu" if group == "dgpu" else "jetson"
            out.append((f"{self.prefix}-{kind}-{i // 2 + 1:02d}", group))
        return out


def rig_cache() -> Path:
    return Path(os.environ.get("VILMS_RIG_CACHE", ROOT / ".cache" / "rig"))


def _expand(text: str, env: dict[str, str]) -> str:
    """molecule.yml's ${VAR} and ${VAR:-default}, from `env` (then os.environ)."""
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name, os.environ.get(name, default))
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)


class _VaultLoader(yaml.SafeLoader):
    """Reads a variables file that holds `!vault` values (kept as None here; the file itself is copied)."""


_VaultLoader.add_constructor("!vault", lambda loader, node: None)


def scenario_group_vars(scenario: str, env: dict[str, str]) -> tuple[dict[str, Any], list[Path]]:
    """The group variables a molecule scenario gives its host (the one source for what a rig box is).

    Inline in molecule.yml (provisioner.inventory.group_vars.all), or a linked group_vars directory
    (provisioner.inventory.links.group_vars): its plain files are merged here, files with vaulted values are
    returned to be copied as they are (Ansible decrypts them with ANSIBLE_VAULT_PASSWORD_FILE).
    """
    scenario_dir = ROOT / "molecule" / scenario
    inventory = yaml.safe_load(_expand((scenario_dir / "molecule.yml").read_text(), env))["provisioner"]["inventory"]
    if "all" in (inventory.get("group_vars") or {}):
        return inventory["group_vars"]["all"], []
    merged: dict[str, Any] = {}
    vaulted: list[Path] = []
    all_dir = scenario_dir / inventory["links"]["group_vars"] / "all"
    for path in sorted(all_dir.glob("*.yml")):
        text = path.read_text()
        if "!vault" in text:
            vaulted.append(path)
        else:
            merged.update(yaml.load(text, Loader=_VaultLoader) or {})
    return merged, vaulted


def group_vars_for(fleet: Fleet, group: str, registry: str | None) -> dict[str, Any]:
    """A fleet group's variables: the scenario's, with the light gateway and (optionally) the site registry."""
    env = {"MOLECULE_PROJECT_DIRECTORY": str(ROOT), "VILMS_RIG_MINILM": str(fleet.state / "no-minilm"),
           "HOME": os.environ.get("HOME", "/root")}
    gv, _ = scenario_group_vars(SCENARIOS[group], env)
    gv["vilms_rig_cache"] = str(rig_cache())
    cfg = gv["vilms_config"]
    cfg.setdefault("docker", {}).setdefault("tag", {})["gateway"] = fleet.prefix  # build_gateway()
    if group == "dgpu":
        cfg["embedding"] = {"enabled": False}
        gv["vilms_rig_expect"] = {**gv.get("vilms_rig_expect", {}), "embeddings": []}
    gateway_image = f"vilms/gateway:{fleet.prefix}"
    engine_image = "vilms-rig/engines:standin" if group == "dgpu" else "vilms-rig/engines:r36.4.0"
    if registry:
        gv["vilms_stack_image_source"] = "registry"
        gv.pop("vilms_stack_image_archives", None)
        cfg["docker"]["pull-policy"] = "missing"
        images = cfg["docker"].setdefault("image", {})
        for key, repo in list(images.items()):
            images[key] = f"{registry}/{repo}"
    else:
        gv["vilms_stack_image_archives"] = [
            {"image": gateway_image, "src": str(fleet.state / "gateway.tar")},
            {"image": engine_image, "src": "{{ vilms_rig_cache }}/images/engines.tar"}]
    return gv


def write_inventory(fleet: Fleet, hosts: list[tuple[str, str]], registry: str | None) -> None:
    """hosts.yml + group_vars/{all,dgpu,jetsons}.yml + one host_vars file per box (for operators and tests)."""
    inv = fleet.inventory
    (inv / "group_vars").mkdir(parents=True, exist_ok=True)
    (inv / "host_vars").mkdir(exist_ok=True)
    groups: dict[str, dict[str, Any]] = {"dgpu": {"hosts": {}}, "jetsons": {"hosts": {}}}
    for name, group in hosts:
        groups[group]["hosts"][name] = None
    header = f"# Simulated fleet '{fleet.prefix}' written by devkit/fleet.py; edit freely (host_vars/ is yours).\n"
    (inv / "hosts.yml").write_text(header + yaml.safe_dump({"all": {"children": groups}}, sort_keys=False))
    all_vars: dict[str, Any] = {
        # Boxes are reached through the Docker API (molecule uses the docker CLI plugin; this one reports a stopped
        # box as unreachable, not as a failed module, and forks no CLI per command); root already, no sudo.
        "ansible_connection": "community.docker.docker_api",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,
    }
    if registry:
        all_vars["docker_engine_daemon_options"] = {
            "log-driver": "json-file", "log-opts": {"max-size": "50m", "max-file": "3"},
            "insecure-registries": [registry]}
    (inv / "group_vars" / "all.yml").write_text(header + yaml.safe_dump(all_vars, sort_keys=False))
    for group in ("dgpu", "jetsons"):
        gv = group_vars_for(fleet, group, registry)
        (inv / "group_vars" / group).mkdir(exist_ok=True)
        (inv / "group_vars" / group / "main.yml").write_text(header + yaml.safe_dump(gv, sort_keys=False))
        for vaulted in scenario_group_vars(SCENARIOS[group], {})[1]:
            shutil.copy(vaulted, inv / "group_vars" / group / vaulted.name)
    for name, _ in hosts:
        path = inv / "host_vars" / f"{name}.yml"
        if not path.exists():
            path.write_text(f"---\n# Per-box overrides for {name} (e.g. vilms_config_host).\n{{}}\n")


def inject_gate_failure(f: Fleet, host: str) -> str:
    """host_vars that pass the schema and fail only the gate; returns the model the gate will find broken.

    One more model, on an OpenAI-compatible engine that is not running: /health/ready never lists it ready and its
    chat request fails, whichever gateway version the box runs.
    """
    group = "dgpu" if "-dgpu-" in host else "jetsons"
    group_vars = yaml.safe_load((f.inventory / "group_vars" / group / "main.yml").read_text())
    broken = "ghost-model"
    models = [*group_vars["vilms_config"]["serving"]["models"],
              {"name": broken, "engine": "openai", "base-url": "http://127.0.0.1:9/v1", "aliases": ["GHOST"],
               "params": {"max-tokens": 4}}]
    data = {"vilms_stack_gate_timeout": 15, "vilms_config_host": {"serving": {"models": models}}}
    (f.inventory / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    return broken


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=300)


def box_image(client: docker.DockerClient, bare: bool) -> str:
    """The image boxes start from: the rig's base image (bare) or that plus Docker (built once, cached)."""
    client.images.get(BASE_IMAGE)  # raises with a clear name when `devkit/rig/rig.sh images` has not run
    if bare:
        return BASE_IMAGE
    try:
        client.images.get(BOX_IMAGE)
    except docker.errors.ImageNotFound:
        print(f"fleet: building {BOX_IMAGE} (Docker preinstalled, once)")
        import io
        client.images.build(fileobj=io.BytesIO(BOX_DOCKERFILE.encode()), tag=BOX_IMAGE, rm=True)
    return BOX_IMAGE


def create_boxes(fleet: Fleet, hosts: list[tuple[str, str]], bare: bool = False) -> None:
    client = docker_client()
    image = box_image(client, bare)
    if not client.networks.list(names=[fleet.network]):
        client.networks.create(fleet.network, driver="bridge", labels=fleet.label)
    for name, group in hosts:
        try:
            client.containers.get(name)
            continue
        except docker.errors.NotFound:
            pass
        client.containers.run(
            image, ["bash", "-c", 'trap "exit 0" TERM; sleep infinity & wait'], name=name, hostname=name,
            detach=True, privileged=True, cgroupns="private", volumes=["/var/lib/docker"],
            network=fleet.network, labels={**fleet.label, "vilms-fleet-group": group})


def build_gateway(fleet: Fleet) -> str:
    """The gateway the boxes run: this checkout's vilms package as one layer over the rig's gateway image.

    The rig's image may come from an older checkout (its cache is shared); the fleet must run the code it deploys
    with (schema, render and gateway agree). Building it is a copy, not a pip install: seconds.
    """
    client = docker_client()
    site = client.containers.run(RIG_GATEWAY, ["-c", "import os, vilms; print(os.path.dirname(vilms.__file__))"],
                                 entrypoint="python3", remove=True).decode().strip()
    tag = f"vilms/gateway:{fleet.prefix}"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "gateway" / "vilms", Path(tmp) / "vilms",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (Path(tmp) / "vilms" / "_data").mkdir(exist_ok=True)
        shutil.copy(ROOT / "schemas" / "vilms-config.schema.json", Path(tmp) / "vilms" / "_data")
        (Path(tmp) / "Dockerfile").write_text(f"FROM {RIG_GATEWAY}\nCOPY vilms {site}\n")
        client.images.build(path=tmp, tag=tag, rm=True)
    return tag


def save_archive(image: str, path: Path) -> None:
    with open(path, "wb") as out:
        for chunk in docker_client().images.get(image).save(named=True):
            out.write(chunk)


def start_registry(fleet: Fleet) -> str:
    """Debian's docker-registry in a box on the fleet network; pushed to from the controller via 127.0.0.1."""
    if not REGISTRY_BINARY.exists():
        raise SystemExit("fleet: the site registry needs Debian's docker-registry package (apt-get install docker-registry)")
    client = docker_client()
    data = fleet.state / "registry"
    data.mkdir(parents=True, exist_ok=True)
    (data / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "info", "formatter": "json"},
        "storage": {"filesystem": {"rootdirectory": "/var/lib/registry"}, "delete": {"enabled": True}},
        "http": {"addr": f":{REGISTRY_PORT}"}}))
    try:
        client.containers.get(fleet.registry)
    except docker.errors.NotFound:
        client.containers.run(
            BASE_IMAGE, ["/usr/local/bin/registry", "serve", "/etc/registry/config.yml"], name=fleet.registry,
            hostname=fleet.registry, detach=True, network=fleet.network, labels=fleet.label,
            ports={f"{REGISTRY_PORT}/tcp": ("127.0.0.1", None)},
            volumes={str(REGISTRY_BINARY): {"bind": "/usr/local/bin/registry", "mode": "ro"},
                     str(data / "config.yml"): {"bind": "/etc/registry/config.yml", "mode": "ro"},
                     str(data / "store"): {"bind": "/var/lib/registry", "mode": "rw"}})
    return f"{fleet.registry}:{REGISTRY_PORT}"


def registry_local(fleet: Fleet) -> str:
    """The registry as the controller's daemon reaches it (loopback: no insecure-registry setting needed)."""
    c = docker_client().containers.get(fleet.registry)
    port = c.attrs["NetworkSettings"]["Ports"][f"{REGISTRY_PORT}/tcp"][0]["HostPort"]
    return f"127.0.0.1:{port}"


def push(fleet: Fleet, image: str, as_name: str | None = None) -> None:
    """Tag `image` into the site registry (as `as_name`, default the same repo:tag) and push it."""
    client = docker_client()
    local = registry_local(fleet)
    repo, _, tag = (as_name or image).rpartition(":")
    client.images.get(image).tag(f"{local}/{repo}", tag)
    for _ in range(30):  # the registry may still be starting
        try:
            out = client.images.push(f"{local}/{repo}", tag=tag)
            if '"error"' in out:
                raise RuntimeError(out)
            client.images.remove(f"{local}/{repo}:{tag}")  # only the push's name; the image keeps its own
            return
        except (docker.errors.APIError, RuntimeError) as exc:
            last = exc
            time.sleep(1)
    raise SystemExit(f"fleet: push of {image} failed: {last}")


def prepare(fleet: Fleet) -> int:
    """molecule/resources/prepare.yml on every box: the NVIDIA driver/runtime and L4T stand-ins."""
    (fleet.state / "no-minilm").mkdir(parents=True, exist_ok=True)
    return run_playbook(fleet, ROOT / "molecule" / "resources" / "prepare.yml", [], report=False)


def ansible_env(fleet: Fleet, report: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["ANSIBLE_ROLES_PATH"] = str(ROOT / "roles")
    env.setdefault("ANSIBLE_FORKS", "20")
    if VAULT_PASSWORD.exists():  # the rig's test-only vault password (molecule's jetson scenario vaults its API key)
        env.setdefault("ANSIBLE_VAULT_PASSWORD_FILE", str(VAULT_PASSWORD))
    if report:
        env["VILMS_FLEET_REPORT_DIR"] = str(fleet.reports)
    else:
        env["VILMS_FLEET_REPORT"] = "off"
    if report and os.environ.get("VILMS_FLEET_ARA"):
        env.update(ara_env(fleet))
    env.update(extra or {})
    return env


def ara_env(fleet: Fleet) -> dict[str, str]:
    """ARA records the raw run (every task and result) in a sqlite file of the fleet's own (VILMS_FLEET_ARA=1)."""
    from ara.setup import callback_plugins as ara_callbacks

    return {"ANSIBLE_CALLBACK_PLUGINS": f"{ROOT / 'plugins' / 'callback'}:{ara_callbacks}",
            "ARA_API_CLIENT": "offline", "ARA_BASE_DIR": str(fleet.state / "ara")}


def ara_static_html(fleet: Fleet) -> Path:
    """`ara-manage generate`: ARA's own UI as static HTML, next to the fleet report."""
    out = fleet.reports / "ara"
    subprocess.run([str(Path(sys.executable).with_name("ara-manage")), "generate", str(out)], check=True,
                   env={**os.environ, **ara_env(fleet)}, stdout=subprocess.DEVNULL)
    return out


def run_playbook(fleet: Fleet, playbook: Path, args: list[str], report: bool = True,
                 env: dict[str, str] | None = None, log: Path | None = None) -> int:
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")), str(playbook), "-i", str(fleet.inventory), *args]
    fleet.state.mkdir(parents=True, exist_ok=True)
    log = log or fleet.state / f"{playbook.stem}.log"
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=ansible_env(fleet, report, env), stdout=out, stderr=subprocess.STDOUT)
    return proc.returncode


def rollout(fleet: Fleet, args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> int:
    """The real site.yml against the fleet's inventory; the fleet report lands in fleet.reports."""
    rc = run_playbook(fleet, ROOT / "site.yml", args, report=True, env=env, log=log)
    if os.environ.get("VILMS_FLEET_ARA"):
        print(f"fleet: ARA's record as static HTML: {ara_static_html(fleet)}/index.html")
    return rc


def net_rx_bytes(names: list[str]) -> dict[str, int]:
    """Bytes each box has received on its network interface (what an image pull costs it)."""
    client = docker_client()
    out = {}
    for name in names:
        res = client.containers.get(name).exec_run(["cat", "/sys/class/net/eth0/statistics/rx_bytes"])
        out[name] = int(res.output.decode().strip())
    return out


def boxes(fleet: Fleet) -> list[str]:
    """The fleet's boxes in inventory order (dgpu first, as the stack play's pattern orders them)."""
    inv = yaml.safe_load((fleet.inventory / "hosts.yml").read_text())["all"]["children"]
    return [h for g in ("dgpu", "jetsons") for h in (inv[g]["hosts"] or {})]


def up(fleet: Fleet, n: int, registry: bool, bare: bool = False) -> None:
    hosts = fleet.host_names(n)
    if fleet.state.exists() and (fleet.inventory / "hosts.yml").exists():
        old = set(boxes(fleet))
        if old != {h for h, _ in hosts}:
            raise SystemExit(f"fleet: '{fleet.prefix}' exists with other boxes; `make fleet-down` first")
    fleet.state.mkdir(parents=True, exist_ok=True)
    create_boxes(fleet, hosts, bare)
    gateway = build_gateway(fleet)
    reg = None
    if registry:
        reg = start_registry(fleet)
        for image in (gateway, "vilms-rig/engines:standin", "vilms-rig/engines:r36.4.0"):
            push(fleet, image)
    else:
        save_archive(gateway, fleet.state / "gateway.tar")
    write_inventory(fleet, hosts, reg)
    rc = prepare(fleet)
    if rc:
        raise SystemExit(f"fleet: prepare failed (rc {rc}); see {fleet.state / 'prepare.log'}")
    print(f"fleet '{fleet.prefix}': {n} boxes, inventory {fleet.inventory}" + (f", registry {reg}" if reg else ""))


def down(fleet: Fleet) -> None:
    client = docker_client()
    for c in client.containers.list(all=True, filters={"label": f"vilms-fleet={fleet.prefix}"}):
        c.remove(force=True, v=True)
    for net in client.networks.list(names=[fleet.network]):
        net.remove()
    for image in client.images.list(name="vilms/gateway"):
        for tag in image.tags:
            if tag.startswith(f"vilms/gateway:{fleet.prefix}"):  # build_gateway()'s and later updates
                client.images.remove(tag, noprune=False)
    if (fleet.state / "registry").exists():
        # the registry wrote as root inside its box; the data is ours to drop
        shutil.rmtree(fleet.state / "registry", ignore_errors=True)
    if fleet.inventory.exists():
        shutil.rmtree(fleet.inventory)
    print(f"fleet '{fleet.prefix}': removed")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """This tool's own arguments, and those after `--` for ansible-playbook (argparse alone cannot take options
    such as `-e` after a positional that it has already filled)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    own, ansible_args = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="rollout -- ARGS: ARGS go to ansible-playbook")
    parser.add_argument("command", choices=["up", "rollout", "down", "inventory"])
    parser.add_argument("--prefix", default=os.environ.get("VILMS_FLEET_PREFIX", "vilms-fleet"))
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", "20")))
    parser.add_argument("--registry", action="store_true", help="serve images from a site registry")
    parser.add_argument("--bare", action="store_true", help="boxes without Docker (the first rollout installs it)")
    args = parser.parse_args(own)
    fleet = Fleet(args.prefix)
    if args.command == "up":
        up(fleet, args.n, args.registry, args.bare)
    elif args.command == "down":
        down(fleet)
    elif args.command == "inventory":
        print(fleet.inventory)
    else:
        started = time.monotonic()
        rc = rollout(fleet, ansible_args)
        print(f"fleet rollout: rc {rc} in {time.monotonic() - started:.0f} s; log {fleet.state / 'site.log'}; "
              f"report {fleet.reports / 'latest.html'}")
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
