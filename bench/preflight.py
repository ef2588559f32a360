"""Preflight time for a fleet: the real `ansible-playbook site.yml --tags preflight`, and the render alone.

`python -m bench.preflight --hosts 500 [--sample 10]` builds a fleet shaped like the one this toolkit is for
(60 % Orin Nano 8 GB, 30 % Orin NX 16 GB, 10 % AGX Orin 64 GB, each with the effective config of the example
inventory's host in that SKU group, plus a few dgpu servers), renders every host in one `vilms render --many` process, and times
`--sample` hosts rendered one process each (the old preflight) to extrapolate that path.

`--ansible` also times what an operator runs: an inventory shaped like inventories/example (its group_vars copied,
its vault file encrypted and opened with --vault-password-file, its host exception on one Nano; hosts nano-0001,
nx-0001, agx-0001, gpu-0001 ... in the example's SKU groups) through `ansible-playbook site.yml -i <it> --tags
preflight` (the first, controller-only play) with the checkout's ansible.cfg, per-task times from
ansible.posix.profile_tasks. The host names resolve nowhere: a task that tried to connect would make its host
unreachable, and the run is refused then. Writes bench/results/preflight.{json,md}; nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "inventories" / "example" / "hosts.yml"
SKUS = {  # share of the Jetson fleet, and the example host whose SKU group it copies (its layers fit that board)
    "orin_nano": (0.6, "jetson-orin-01.example"), "orin_nx": (0.3, "jetson-nx-01.example"),
    "agx_orin": (0.1, "jetson-agx-01.example")}


def fleet(hosts: int) -> dict:
    """{"hosts": {name: {config, gpu, engine_tag}}} for `hosts` boxes (about 1 in 50 a dgpu server).

    Each box copies the effective config of an example host of its kind, merged by the preflight role itself
    (`effective_configs`, the merge `vilms plan --inventory` uses: the example's layers, not a merge written here).
    """
    from vilms.deploy.capacity_inventory import effective_configs

    example = effective_configs(str(EXAMPLE))
    for entry in example.values():  # the vaulted key, as a site's vault would hold it
        entry["config"]["gateway"]["api-keys"][0]["key"] = "sk-bench-0123456789abcdef"
    out: dict = {}
    servers = max(1, hosts // 50)
    for i in range(servers):
        out[f"gpu-{i:03d}"] = {"config": example["gpu-server-01.example"]["config"], "gpu": True}
    jetsons = hosts - servers
    counts = {sku: int(round(share * jetsons)) for sku, (share, _) in SKUS.items()}
    counts["orin_nano"] += jetsons - sum(counts.values())
    for sku, n in counts.items():
        config = copy.deepcopy(example[SKUS[sku][1]]["config"])
        for i in range(n):
            out[f"{sku}-{i:03d}"] = {"config": config, "gpu": False, "engine_tag": "r36.4.0"}
    return {"hosts": out}


EXAMPLE_SKUS = {"orin_nano_8gb": ("nano", 0.6), "orin_nx_16gb": ("nx", 0.3), "agx_orin_64gb": ("agx", 0.1)}
BIN = Path(sys.executable).parent


def example_inventory(tmp: Path, hosts: int) -> tuple[Path, Path, dict[str, int]]:
    """inventories/example/ grown to `hosts` boxes, as a site would copy it: (hosts.yml, vault password file, counts).

    Its group_vars as they are (vault.yml encrypted, as the example tells a site to), its one host exception
    (host_vars) on the second Nano, about 1 in 50 boxes a dgpu server and the Jetsons 60/30/10 over its SKU groups.
    """
    site = tmp / "site"
    shutil.copytree(ROOT / "inventories" / "example", site)
    password = tmp / "vault-pass"
    password.write_text("bench-vault-password-0123456789\n")
    password.chmod(0o600)
    subprocess.run([str(BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(password),
                    str(site / "group_vars" / "all" / "vault.yml")], check=True, capture_output=True, timeout=120)
    inventory = yaml.safe_load((site / "hosts.yml").read_text())
    servers = max(1, hosts // 50)
    jetsons = hosts - servers
    counts = {group: int(round(share * jetsons)) for group, (_, share) in EXAMPLE_SKUS.items()}
    counts["orin_nano_8gb"] += jetsons - sum(counts.values())
    counts["dgpu"] = servers
    inventory["all"]["children"]["dgpu"]["hosts"] = {f"gpu-{i:04d}": None for i in range(1, servers + 1)}
    for group, (prefix, _) in EXAMPLE_SKUS.items():
        inventory["all"]["children"]["jetsons"]["children"][group]["hosts"] = {
            f"{prefix}-{i:04d}": None for i in range(1, counts[group] + 1)}
    (site / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    exceptions = list((site / "host_vars").glob("*.yml"))
    for i, path in enumerate(exceptions):  # the example's exceptions, on the first Nanos but one
        path.rename(site / "host_vars" / f"nano-{i + 2:04d}.yml")
    return site / "hosts.yml", password, counts


def forks_in(cfg: Path) -> int:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg)
    return int(os.environ.get("ANSIBLE_FORKS") or parser.get("defaults", "forks", fallback="5"))


def by_play(log: str, timed: list[tuple[str, float]]) -> list[dict]:
    """profile_tasks' times (execution order) summed per play: the log names each task's play, in the same order."""
    order: list[tuple[str, str]] = []
    play = ""
    for kind, name in re.findall(r"^(PLAY|TASK) \[(.*)\] \*+$", log, re.M):
        if kind == "PLAY":
            play = name
        elif (play, name) not in order:  # a play run in serial batches runs the same tasks again
            order.append((play, name))
    if [name for _, name in order] != [name for name, _ in timed]:
        return []
    plays: dict[str, float] = {}
    for (play, _), (_, sec) in zip(order, timed):
        plays[play] = plays.get(play, 0.0) + sec
    return [{"play": name, "s": round(sec, 2)} for name, sec in plays.items()]


def tasks_of_host(log: str, host: str) -> dict[str, int]:
    """How many tasks ran for `host` in each play: its result lines (a loop's items not counted) and the includes
    that name it (an include is a task per host too)."""
    counts: dict[str, int] = {}
    play = ""
    result = re.compile(rf"^(ok|changed|skipping|failed|fatal): \[{re.escape(host)}(\]| -> )")
    for line in log.splitlines():
        if line.startswith("PLAY ["):
            play = line[len("PLAY ["):line.rindex("]")]
        elif ((result.match(line) and "(item=" not in line)
              or (line.startswith("included: ") and host in line.rpartition(" for ")[2].split(", "))):
            counts[play] = counts.get(play, 0) + 1
    return counts


def ansible_preflight(hosts: int, forks: int | None, tmp: Path) -> dict:
    """One timed `ansible-playbook site.yml --tags preflight` on the grown example inventory."""
    inventory, password, counts = example_inventory(tmp, hosts)
    for name in ("nano-0001", "gpu-0001"):  # a task that connected would make its host unreachable: refused below
        try:
            socket.getaddrinfo(name, 22)
            raise SystemExit(f"{name} resolves on this machine: a connecting task would not show as unreachable")
        except socket.gaierror:
            pass
    cfg = ROOT / "ansible.cfg"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({"HOME": str(tmp), "ANSIBLE_CONFIG": str(cfg), "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
                "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
                # the checkout's callbacks as ansible.cfg enables them, plus the per-task timer
                "ANSIBLE_CALLBACKS_ENABLED": "vilms_fleet_report, vilms_render_cleanup, ansible.posix.profile_tasks",
                "PROFILE_TASKS_TASK_OUTPUT_LIMIT": "all", "PROFILE_TASKS_SORT_ORDER": "none"})
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"), "--tags", "preflight",
            "--vault-password-file", str(password)] + (["--forks", str(forks)] if forks else [])
    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    cpu_after = os.times()
    load_after = os.getloadavg()[0]
    recap = {h: dict(re.findall(r"(\w+)=(\d+)", rest))
             for h, rest in re.findall(r"^(\S+)\s+: (ok=\d+.*)$", run.stdout, re.M)}
    if (run.returncode != 0 or len(recap) != hosts
            or any(r.get("unreachable") != "0" or r.get("failed") != "0" for r in recap.values())):
        raise SystemExit(f"the preflight run failed (rc {run.returncode}, {len(recap)} hosts in the recap, "
                         f"unreachable or failed: {[h for h, r in recap.items() if r.get('unreachable') != '0'][:5]}):"
                         f"\n{(run.stdout + run.stderr)[-6000:]}")
    recap_text = run.stdout[run.stdout.rfind("=" * 20):]
    timed = [(name.strip(), float(sec)) for name, sec in re.findall(r"^(.+?) -+ (\d+\.\d+)s$", recap_text, re.M)]
    last_nano = f"nano-{counts['orin_nano_8gb']:04d}"  # a host that runs no run_once task
    return {"wall_s": round(wall, 2), "ms_per_host": round(1000 * wall / hosts, 1),
            "cpu_s": round((cpu_after.children_user + cpu_after.children_system)
                           - (cpu_before.children_user + cpu_before.children_system), 1),
            "forks": forks or forks_in(cfg), "hosts": counts, "load_1m": [round(load_before, 2), round(load_after, 2)],
            "ansible": subprocess.run([str(BIN / "ansible"), "--version"], capture_output=True, text=True
                                      ).stdout.split("\n")[0].strip(),
            "tasks_per_nano_host": tasks_of_host(run.stdout, last_nano),
            "plays": by_play(run.stdout, timed),
            "tasks": [{"task": t, "s": sec} for t, sec in sorted(timed, key=lambda ts: -ts[1])]}


def cell(text: str) -> str:
    """A task or play name as a Markdown table cell (names use ' | ' themselves; argument checks are long)."""
    text = text if len(text) <= 110 else text[:109] + "…"
    return text.replace("|", "\\|")


def vilms(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vilms", *args], check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--sample", type=int, default=10, help="hosts rendered one process each (old path)")
    parser.add_argument("--ansible", action="store_true",
                        help="also time ansible-playbook site.yml --tags preflight on the example inventory grown to --hosts")
    parser.add_argument("--forks", type=int, help="ansible-playbook --forks (default: ansible.cfg's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    spec = fleet(args.hosts)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vilms-preflight-") as tmp:
        many = Path(tmp) / "many.json"
        many.write_text(json.dumps(spec))
        many_s = vilms("render", "--many", str(many), "--out", f"{tmp}/many")
        names = list(spec["hosts"])[: args.sample]
        single_s = 0.0
        for name in names:
            entry = spec["hosts"][name]
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(entry["config"]))
            single_s += vilms("render", "--config", f"{tmp}/{name}.yaml", "--out", f"{tmp}/one/{name}",
                              "--gpu", "yes" if entry["gpu"] else "no",
                              *(["--engine-tag", entry["engine_tag"]] if entry.get("engine_tag") else []))
    per_host_single = single_s / max(1, len(names))
    result = {"hosts": args.hosts, "many_s": round(many_s, 2), "many_ms_per_host": round(1000 * many_s / args.hosts, 2),
              "single_s_per_host": round(per_host_single, 3),
              "single_extrapolated_s": round(per_host_single * args.hosts, 1),
              "render_load_1m": round(load_before, 2),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d")}
    command = f"python -m bench.preflight --hosts {args.hosts} --sample {args.sample}"
    if args.ansible:
        with tempfile.TemporaryDirectory(prefix="vilms-preflight-ansible-") as tmp:
            result["ansible"] = ansible_preflight(args.hosts, args.forks, Path(tmp))
        command += " --ansible" + (f" --forks {args.forks}" if args.forks else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(result, indent=2) + "\n")
    text = (f"# Preflight, {args.hosts} hosts ({result['machine']}, {result['date']})\n\n`{command}`\n\n")
    if args.ansible:
        a = result["ansible"]
        text += (f"## `ansible-playbook site.yml --tags preflight` (the example inventory, {args.hosts} hosts)\n\n"
                 f"{a['ansible']}, forks {a['forks']}, hosts {a['hosts']}; load average (1 min) "
                 f"{a['load_1m'][0]} before, {a['load_1m'][1]} after.\n\n"
                 "| wall s | per host | CPU s (ansible-playbook, its workers, vilms) |\n|---|---|---|\n"
                 f"| {a['wall_s']} | {a['ms_per_host']} ms | {a['cpu_s']} |\n\n"
                 "Per play and per task (ansible.posix.profile_tasks: from a task's start to the next one's, all "
                 "hosts; with `--tags preflight` the later plays run only their roles' argument checks, which "
                 "Ansible tags `always`):\n\n"
                 "| play | s | tasks per host (a Nano) |\n|---|---|---|\n"
                 + "".join(f"| {cell(p['play'])} | {p['s']} | {a['tasks_per_nano_host'].get(p['play'], 0)} |\n"
                           for p in a["plays"]) + "\n"
                 "| task | s |\n|---|---|\n" + "".join(f"| {cell(t['task'])} | {t['s']} |\n" for t in a["tasks"]) + "\n")
    text += (f"## The render alone (no Ansible; load average {result['render_load_1m']})\n\n"
             "| path | total s | per host |\n|---|---|---|\n"
             f"| `vilms render --many` (one process) | {result['many_s']} | {result['many_ms_per_host']} ms |\n"
             f"| `vilms render` per host ({len(names)} sampled, extrapolated) | {result['single_extrapolated_s']} | "
             f"{result['single_s_per_host']} s |\n")
    (out / "preflight.md").write_text(text)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
