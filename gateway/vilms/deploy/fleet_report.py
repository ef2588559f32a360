"""The fleet report: what a rollout did to each host, as JSON (for tools) and one HTML page (for people).

The callback plugin (plugins/callback/vilms_fleet_report.py) collects events while site.yml runs and hands a
plain dict to `write()`; this module owns the report's shape, each host's outcome and the page. Kept free of
Ansible imports so the page can be re-rendered from a saved JSON file:

    python -m vilms.fleet_report report.json -o report.html
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2

REPORT_VERSION = 1

# Outcomes, most to least severe; the page colours rows by them and the summary counts them.
OUTCOMES: dict[str, str] = {
    "down": "rollback failed: the host serves nothing",
    "failed": "failed (no rollback ran)",
    "rolled_back": "failed its gate, back on its previous release",
    "unreachable": "could not be reached",
    "halted": "stopped mid-batch because the batch's failure budget was spent",
    "untouched": "not reached: the rollout halted before its batch",
    "updated": "new release, gate passed",
    "unchanged": "already up to date, gate passed",
}
# A host counts against the failure budget with these outcomes.
FAILED = {"down", "failed", "rolled_back"}
# Every outcome but these puts the host on the retry list (`--limit @<stem>.retry`).
DONE = {"updated", "unchanged"}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Counts per outcome and the one-line verdict at the top of the page."""
    hosts = report["hosts"]
    counts = Counter(h["outcome"] for h in hosts.values())
    rollout = report.get("rollout") or {}
    if rollout.get("halted"):
        verdict = f"HALTED in batch {rollout.get('halted_in_batch')}: {rollout.get('halt_reason', '')}".strip()
    elif any(counts[o] for o in FAILED | {"unreachable"}):
        verdict = "COMPLETED with failures"
    else:
        verdict = "COMPLETED"
    return {"counts": {o: counts[o] for o in OUTCOMES if counts[o]}, "verdict": verdict, "hosts": len(hosts)}


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("vilms.deploy", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page: verdict, batch timeline, one row per host coloured by outcome."""
    duration = max(report.get("duration_s") or 0.0, 1e-6)
    batches = [dict(b, left=100.0 * b["start_s"] / duration,
                    width=max(100.0 * (b["end_s"] - b["start_s"]) / duration, 0.5))
               for b in (report.get("rollout") or {}).get("batches", [])]
    order = {o: i for i, o in enumerate(OUTCOMES)}
    rows = sorted(report["hosts"].items(),
                  key=lambda kv: (kv[1].get("batch") or 10**6, order.get(kv[1]["outcome"], 99), kv[0]))
    return _env().get_template("fleet-report.html.j2").render(
        report=report, summary=report.get("summary") or summarize(report), batches=batches, rows=rows,
        outcomes=OUTCOMES)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def retry_hosts(report: dict[str, Any]) -> list[str]:
    """The hosts to run again: every host whose outcome is not a release that passed its gate."""
    return sorted(name for name, host in report["hosts"].items() if host["outcome"] not in DONE)


def write(report: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """`<stem>.json`, `<stem>.html` and `<stem>.retry` (one host a line, for `--limit @FILE`; empty when every
    host is done) in out_dir, and `latest.*` pointing at this run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    retry = retry_hosts(report)
    report = dict(report, version=REPORT_VERSION, summary=summarize(report), retry=retry)
    json_path, html_path = out_dir / f"{stem}.json", out_dir / f"{stem}.html"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    _atomic_write(html_path, render_html(report))
    _atomic_write(out_dir / f"{stem}.retry", "".join(f"{name}\n" for name in retry))
    for src, name in ((json_path, "latest.json"), (html_path, "latest.html"),
                      (out_dir / f"{stem}.retry", "latest.retry")):
        link = out_dir / name
        tmp = out_dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src.name)
        os.replace(tmp, link)
    return json_path, html_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a fleet report's HTML page from its JSON.")
    parser.add_argument("json_file", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = json.loads(args.json_file.read_text())
    args.out.write_text(render_html(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
