"""`make bench-ollama-ship N=4 MIB=256`: what shipping Ollama models from the controller costs, on the simulated fleet.

N Jetson boxes (devkit/fleet.py; N dgpu boxes are created beside them and left alone) get the rig's two Ollama models
(`qwen2.5:3b`, `qwen2.5vl:3b`) from a local Ollama store on the controller whose model layer is MIB MiB of random
bytes, shared by both models as Ollama shares equal blobs. One rollout of the Jetsons (`-l jetsons`), then a second
one with nothing to do. Measured: bytes the controller's cache took in (once for the fleet), bytes each box's
Ollama store grew by, the wall time of both rollouts and the second one's changed count.
Results: bench/results/ollama-ship-<N>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from devkit import fleet as fleetlib
from devkit import ollama_models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STORE = "/opt/vilms/ollama/models"


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def box_store_bytes(name: str) -> int:
    out = fleetlib.docker_client().containers.get(name).exec_run(["du", "-sb", STORE])
    return int(out.output.split()[0]) if out.exit_code == 0 else 0


def rollout(fleet: fleetlib.Fleet, log: Path) -> tuple[int, float, str]:
    started = time.monotonic()
    rc = fleetlib.rollout(fleet, ["-l", "jetsons"], log=log)
    return rc, round(time.monotonic() - started, 1), log.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", "4")), help="Jetson boxes")
    parser.add_argument("--mib", type=int, default=int(os.environ.get("MIB", "256")), help="model layer size")
    parser.add_argument("--keep", action="store_true", help="leave the fleet up afterwards")
    args = parser.parse_args()
    fleet = fleetlib.Fleet("vilms-olship")
    fleetlib.down(fleet)
    fleetlib.up(fleet, 2 * args.n, registry=False)
    store, cache = fleet.state / "ollama-store", fleet.state / "ollama-cache"
    shutil.rmtree(store, ignore_errors=True), shutil.rmtree(cache, ignore_errors=True)
    ollama_models.write_store(store, ["qwen2.5:3b", "qwen2.5vl:3b"], os.urandom(args.mib << 20))
    gv_path = fleet.inventory / "group_vars" / "jetsons" / "main.yml"
    gv = yaml.safe_load(gv_path.read_text())
    gv.update(vilms_stack_ollama_local_store=str(store), vilms_stack_ollama_cache=str(cache))
    gv_path.write_text(yaml.safe_dump(gv, sort_keys=False))
    jetsons = [h for h, g in fleet.host_names(2 * args.n) if g == "jetsons"]
    before = {h: box_store_bytes(h) for h in jetsons}
    rc1, first_s, _ = rollout(fleet, fleet.state / "ship-1.log")
    after = {h: box_store_bytes(h) for h in jetsons}
    rc2, second_s, text2 = rollout(fleet, fleet.state / "ship-2.log")
    changed = [int(m) for m in re.findall(r"changed=(\d+)", text2.split("PLAY RECAP")[-1])]
    result = {
        "boxes": args.n, "model_layer_mib": args.mib, "model_bytes": tree_bytes(store),
        "controller_cache_bytes": tree_bytes(cache), "first_rollout": {"rc": rc1, "seconds": first_s},
        "box_store_bytes": {h: after[h] - before[h] for h in jetsons},
        "second_rollout": {"rc": rc2, "seconds": second_s, "changed": changed,
                           "box_store_bytes": {h: box_store_bytes(h) - after[h] for h in jetsons}},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ollama-ship-{args.n}.json").write_text(json.dumps(result, indent=2) + "\n")
    per_box = sorted(set(result["box_store_bytes"].values()))
    (RESULTS / f"ollama-ship-{args.n}.md").write_text(
        f"# Ollama models shipped from the controller to {args.n} Jetsons\n\n"
        f"Two models sharing one {args.mib} MiB layer; store on the controller: {result['model_bytes']:,} bytes.\n\n"
        f"| what | bytes |\n|---|---|\n"
        f"| controller cache (fetched once for the fleet) | {result['controller_cache_bytes']:,} |\n"
        f"| each box's Ollama store grew by | {', '.join(f'{b:,}' for b in per_box)} |\n"
        f"| second rollout, each box | {', '.join(str(v) for v in result['second_rollout']['box_store_bytes'].values())} |\n\n"
        f"First rollout rc {rc1} in {first_s} s; second rc {rc2} in {second_s} s, changed per box {changed}; "
        f"load average {result['load_average']}.\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        fleetlib.down(fleet)
    return 0 if rc1 == rc2 == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
