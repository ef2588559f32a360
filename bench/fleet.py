"""`make fleet-bench N=20`: wall time of fleet rollouts on the simulated fleet, and where the time goes.

Runs, on one fresh fleet of N boxes (devkit/fleet.py):
  1. first rollout (bare boxes: Docker installed, images shipped, stack up, gate);
  2. update rollout: config only (every model's max-tokens) and one image changed (the gateway plus one layer),
     with the default canary batches [1, "25%", "100%"]; one box of the last batch fails its gate (injected through
     its host_vars) and a failure budget of 50 % per batch lets the rollout complete around it;
  3. optionally (--variants) the same no-op rollout under different Ansible settings (pipelining off, forks 5,
     fact caching) to show what each changes.
Every rollout runs with ansible.posix.profile_tasks; the ten slowest tasks of each are kept. Bytes each box received
for the update are measured on its network interface (registry) or as the archive bytes shipped (archives).
Results: bench/results/fleet-<source>-<N>.json (+ the fleet report JSON/HTML of the update rollout next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from devkit import fleet as fleetlib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROFILE_LINE = re.compile(r"^(?P<task>.+?) -+ (?P<secs>\d+\.\d+)s$")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def slowest_tasks(log: str, top: int = 10) -> list[dict[str, Any]]:
    """profile_tasks' closing table: 'role : Task name ----- 12.34s'."""
    rows = [m.groupdict() for line in log.splitlines() if (m := PROFILE_LINE.match(line.strip()))]
    return [{"task": r["task"].strip(), "s": float(r["secs"])} for r in rows][:top]


def timed_rollout(fleet: fleetlib.Fleet, name: str, extra: dict[str, Any], env: dict[str, str] | None = None,
                  rx: bool = False) -> dict[str, Any]:
    names = fleetlib.boxes(fleet)
    before = fleetlib.net_rx_bytes(names) if rx else {}
    log = fleet.state / f"bench-{name}.log"
    env = {"ANSIBLE_CALLBACKS_ENABLED": "vilms_fleet_report,ansible.posix.profile_tasks", **(env or {})}
    load_before = load_average()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    rc = fleetlib.rollout(fleet, ["-e", json.dumps(extra)], env=env, log=log)
    wall = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the controller's own cost: ansible-playbook and its forks (the boxes' work runs in their containers)
    controller_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    report = json.loads((fleet.reports / "latest.json").read_text())
    out: dict[str, Any] = {
        "name": name, "rc": rc, "wall_s": round(wall, 1), "hosts": len(names),
        "hosts_per_min": round(len(names) / (wall / 60), 2), "load_before": load_before, "load_after": load_average(),
        "controller_cpu_s": round(controller_cpu, 1), "controller_cpu_s_per_host": round(controller_cpu / len(names), 1),
        "outcomes": report["summary"]["counts"], "slowest_tasks": slowest_tasks(log.read_text()),
        "batches": [{"index": b["index"], "hosts": len(b["hosts"]), "s": round(b["end_s"] - b["start_s"], 1)}
                    for b in (report.get("rollout") or {}).get("batches", [])],
        "stack_play_start_s": min((b["start_s"] for b in (report.get("rollout") or {}).get("batches", [])),
                                  default=None),
        "env": env}
    if rx:
        after = fleetlib.net_rx_bytes(names)
        out["rx_bytes_per_host"] = {n: after[n] - before[n] for n in names}
    out["report"] = str(fleet.reports / os.readlink(fleet.reports / "latest.json"))
    print(f"fleet-bench {name}: rc {rc}, {wall:.0f} s for {len(names)} hosts, load {load_before} -> {out['load_after']}")
    return out


def changed_gateway_image(fleet: fleetlib.Fleet, tag: str, registry: bool) -> int:
    """The gateway image plus one 256 KiB layer, as an update ships it; returns the new layer's size."""
    client = fleetlib.docker_client()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "Dockerfile").write_text(f"FROM vilms/gateway:{fleet.prefix}\nCOPY note /etc/vilms-release-note\n")
        Path(tmp, "note").write_bytes(os.urandom(256 * 1024))
        client.images.build(path=tmp, tag=f"vilms/gateway:{tag}", rm=True)
    if registry:
        fleetlib.push(fleet, f"vilms/gateway:{tag}")
    else:
        archive = fleet.state / f"gateway-{tag}.tar"
        with open(archive, "wb") as f:
            for chunk in client.images.get(f"vilms/gateway:{tag}").save(named=True):
                f.write(chunk)
    return 256 * 1024


def point_fleet_at(fleet: fleetlib.Fleet, tag: str, registry: bool, max_tokens: int) -> None:
    import yaml

    for group in ("dgpu", "jetsons"):
        path = fleet.inventory / "group_vars" / group / "main.yml"
        gv = yaml.safe_load(path.read_text())
        gv["vilms_config"]["docker"]["tag"]["gateway"] = tag
        for model in gv["vilms_config"]["serving"]["models"]:
            model.setdefault("params", {})["max-tokens"] = max_tokens
        if not registry:
            for entry in gv["vilms_stack_image_archives"]:
                if entry["image"].startswith("vilms/gateway:"):
                    entry.update(image=f"vilms/gateway:{tag}", src=str(fleet.state / f"gateway-{tag}.tar"))
        path.write_text(yaml.safe_dump(gv, sort_keys=False))


def mitogen_env(fleet: fleetlib.Fleet) -> dict[str, str]:
    """Mitogen's linear strategy, and the boxes reached over the `docker` CLI connection it can take over (it
    replaces `ssh`, `docker`, `local`…, not community.docker's `docker_api`, which the fleet uses by default)."""
    import ansible_mitogen

    path = fleet.inventory / "group_vars" / "all.yml"
    path.write_text(path.read_text().replace("ansible_connection: community.docker.docker_api",
                                             "ansible_connection: docker"))
    return {"ANSIBLE_STRATEGY_PLUGINS": str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"),
            "ANSIBLE_STRATEGY": "mitogen_linear"}


def stem(result: dict[str, Any]) -> str:
    return f"fleet-{result['source']}-{result['n']}" + ("-mitogen" if result.get("mitogen") else "")


def save(result: dict[str, Any]) -> Path:
    """Written after every run, so a long benchmark cut short still leaves what it measured."""
    out = RESULTS / f"{stem(result)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--prefix", default="vilms-bench")
    parser.add_argument("--archive", action="store_true", help="per-host image archives instead of a site registry")
    parser.add_argument("--variants", action="store_true", help="also time pipelining off / forks 5 / fact cache")
    parser.add_argument("--keep", action="store_true", help="leave the fleet up afterwards")
    parser.add_argument("--mitogen", action="store_true", help="every rollout under Mitogen (pip install mitogen)")
    args = parser.parse_args(argv)
    registry = not args.archive
    fleet = fleetlib.Fleet(args.prefix)
    fleetlib.down(fleet)
    result: dict[str, Any] = {"n": args.n, "source": "registry" if registry else "archive",
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": []}
    t0 = time.monotonic()
    fleetlib.up(fleet, args.n, registry=registry)
    result["fleet_up_s"] = round(time.monotonic() - t0, 1)
    strategy = mitogen_env(fleet) if args.mitogen else {}
    result["mitogen"] = args.mitogen
    first = timed_rollout(fleet, "first", {"vilms_rollout_batches": ["100%"]}, strategy)
    result["runs"].append(first)
    save(result)
    tag = f"{args.prefix}-2"
    layer = changed_gateway_image(fleet, tag, registry)
    point_fleet_at(fleet, tag, registry, max_tokens=12)
    boxes = fleetlib.boxes(fleet)
    injected = boxes[-1]
    broken = fleetlib.inject_gate_failure(fleet, injected)
    update = timed_rollout(fleet, "update", {"vilms_rollout_max_fail_percentage": 50}, strategy, rx=registry)
    update["injected_failure"] = {"host": injected, "model": broken}
    (fleet.inventory / "host_vars" / f"{injected}.yml").write_text("---\n{}\n")
    if not registry:
        size = (fleet.state / f"gateway-{tag}.tar").stat().st_size
        update["archive_bytes_per_host"] = size
    update["changed_layer_bytes"] = layer
    result["runs"].append(update)
    shutil.copy(update["report"], RESULTS / f"{stem(result)}-report.json")
    shutil.copy(Path(update["report"]).with_suffix(".html"), RESULTS / f"{stem(result)}-report.html")
    save(result)
    noop = {"vilms_rollout_batches": ["100%"]}
    if args.variants:
        cache = {"ANSIBLE_GATHERING": "smart", "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
                 "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(fleet.state / "facts"), "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "86400"}
        no_pipelining = {**cache, "ANSIBLE_PIPELINING": "false"}
        for name, env in (("settle", cache),  # deploys the box that failed its gate; fills the fact cache
                          ("noop", cache),  # baseline: nothing to change, pipelining on, facts from the cache
                          ("noop-no-fact-cache", {}),
                          ("noop-no-pipelining", no_pipelining)):
            result["runs"].append(timed_rollout(fleet, name, noop, {**env, **strategy}))
            save(result)
    out = save(result)
    print(f"fleet-bench: {out}")
    if not args.keep:
        fleetlib.down(fleet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
