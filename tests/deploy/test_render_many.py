"""`vilms render --many`: every host in one process, the same bytes as one `vilms render` per host, all or nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from tests.deploy.test_render import DGPU, SEED, render_dir, vilms

KEYED = {**copy.deepcopy(DGPU), "gateway": {"api-keys": [{"name": "ops", "key": "sk-ops-0123456789abcdef"}]}}


def many_file(tmp_path: Path, hosts: dict) -> Path:
    """The hosts' configs in the key order `render_dir`'s YAML file gives them (a render keeps its input's order)."""
    path = tmp_path / "many.json"
    hosts = {name: {**entry, "config": yaml.safe_load(yaml.safe_dump(entry["config"]))} for name, entry in hosts.items()}
    path.write_text(json.dumps({"hosts": hosts}))
    return path


def test_each_host_gets_the_bytes_its_own_render_gives(tmp_path):
    hosts = {"jetson-01": {"config": SEED, "gpu": False, "engine_tag": "r36.4.0"},
             "gpu-01": {"config": DGPU, "gpu": True}, "gpu-02": {"config": KEYED, "gpu": True}}
    result = vilms("render", "--many", str(many_file(tmp_path, hosts)), "--out", str(tmp_path / "all"),
                   "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["failed"] == [] and sorted(report["hosts"]) == sorted(hosts)
    singles = {"jetson-01": render_dir(tmp_path, SEED, "--gpu", "no", "--engine-tag", "r36.4.0", name="j")[0],
               "gpu-01": render_dir(tmp_path, DGPU, "--gpu", "yes", name="g1")[0],
               "gpu-02": render_dir(tmp_path, KEYED, "--gpu", "yes", name="g2")[0]}
    for host, single in singles.items():
        names = sorted(p.name for p in single.iterdir())
        assert sorted(p.name for p in (tmp_path / "all" / host).iterdir()) == names
        for name in names:
            assert (tmp_path / "all" / host / name).read_bytes() == (single / name).read_bytes(), (host, name)
    assert oct((tmp_path / "all" / "gpu-02" / "keys.yaml").stat().st_mode & 0o777) == "0o600"
    again = json.loads(vilms("render", "--many", str(many_file(tmp_path, hosts)), "--out", str(tmp_path / "all"),
                             "--format", "json").stdout)
    assert all(h["changed"] == [] for h in again["hosts"].values())  # a rerun rewrites nothing


def test_one_bad_host_stops_every_host_and_names_host_and_pointer(tmp_path):
    bad = copy.deepcopy(DGPU)
    bad["serving"]["models"][0]["type"] = "chatbot"
    hosts = {"gpu-01": {"config": DGPU}, "gpu-bad": {"config": bad}, "../escape": {"config": DGPU}}
    result = vilms("render", "--many", str(many_file(tmp_path, hosts)), "--out", str(tmp_path / "all"),
                   "--format", "json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["failed"] == ["../escape", "gpu-bad"]
    assert any(e["pointer"] == "/serving/models/0/type" for e in report["hosts"]["gpu-bad"]["errors"])
    assert not (tmp_path / "all").exists()  # nothing written for the valid host either
    text = vilms("render", "--many", str(many_file(tmp_path, hosts)), "--out", str(tmp_path / "all"))
    assert text.returncode == 1 and "gpu-bad: error: /serving/models/0/type" in text.stderr
    assert "nothing written" in text.stderr


def test_ipv6_inventory_names_render_and_paths_do_not(tmp_path):
    """An inventory may name a host by its IPv6 address; a name that could leave OUT (`/`, `..`) is still refused."""
    hosts = {"2001:db8::7": {"config": DGPU, "gpu": True}, "fd00:1::2": {"config": DGPU, "gpu": True}}
    result = vilms("render", "--many", str(many_file(tmp_path, hosts)), "--out", str(tmp_path / "all"),
                   "--format", "json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "all" / "2001:db8::7" / "plan.json").is_file()
    bad = {"a/b": {"config": DGPU}, "..": {"config": DGPU}}
    report = json.loads(vilms("render", "--many", str(many_file(tmp_path, bad)), "--out", str(tmp_path / "bad"),
                              "--format", "json").stdout)
    assert report["failed"] == ["..", "a/b"] and not (tmp_path / "bad").exists()
