"""Preflight render time for a fleet: `vilms render --many` (one process) against one `vilms render` per host.

`python -m bench.preflight --hosts 500 [--sample 10]` builds a fleet shaped like the one this toolkit is for
(60 % Orin Nano 8 GB, 30 % Orin NX 16 GB, 10 % AGX Orin 64 GB, each with the effective config of the example
inventory's host in that SKU group, plus a few dgpu servers), renders every host in one `vilms render --many` process, and times
`--sample` hosts rendered one process each (the old preflight) to extrapolate that path. Writes
bench/results/preflight.{json,md}. Nothing leaves this machine; only the render (no Ansible) is timed here.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
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


def vilms(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vilms", *args], check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--sample", type=int, default=10, help="hosts rendered one process each (old path)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    spec = fleet(args.hosts)
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
              "machine": f"{platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "preflight.md").write_text(
        f"# Preflight render, {args.hosts} hosts ({result['machine']}, {result['date']})\n\n"
        f"`python -m bench.preflight --hosts {args.hosts} --sample {args.sample}`\n\n"
        "| path | total s | per host |\n|---|---|---|\n"
        f"| `vilms render --many` (one process) | {result['many_s']} | {result['many_ms_per_host']} ms |\n"
        f"| `vilms render` per host ({len(names)} sampled, extrapolated) | {result['single_extrapolated_s']} | "
        f"{result['single_s_per_host']} s |\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
