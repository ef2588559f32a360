"""House rules for roles and playbooks, read from the files (no Ansible run): defaults live in the schema (and each
role's defaults/main.yml for role-only knobs), the inventory's config layers are merged once, and no role reaches
outside itself.

Run against the tree before vilms_preflight these failed: `vilms_gpu | default(true)` in five places, the models
dir's default read from `role_path ~ '/../../schemas/...'`, and the vilms_config layers merged in three files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "schemas" / "vilms-config.schema.json"
MERGE_HOME = ROOT / "roles" / "vilms_preflight" / "vars" / "main.yml"
# `<expr> | default(<literal>)`: the expression's last key (a name, .attr, ['key'] or ["key"]) and the literal.
DEFAULTED = re.compile(r"""(?:\[['"](?P<item>[\w-]+)['"]\]|(?P<attr>[A-Za-z_][\w]*))\s*\|\s*default\(\s*(?P<lit>[^,()]*)[,)]""")
BARE = re.compile(r"(?<![\w.\]'\"])(?P<name>[A-Za-z_]\w*)\s*\|\s*default\(")
# A config layer named in Ansible's expressions: vilms_config, vilms_config_group, vilms_config_host, vilms_config__*
# (also inside the one lookup that finds them by pattern).
LAYERS = re.compile(r"\bvilms_config(?:_group|_host|__\w+)?(?![\w])")
JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|^\s*(?:when|that|loop):[^\n]*", re.S | re.M)


def ansible_files() -> Iterator[Path]:
    for top in ("roles", "playbooks"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in (".yml", ".yaml", ".j2"):
                yield path


def schema_defaults() -> dict[str, list[Any]]:
    """Every property name in the schema (any depth, $defs included) -> the defaults it declares."""
    found: dict[str, list[Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if isinstance(sub, dict) and "default" in sub:
                    found.setdefault(name, []).append(sub["default"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(SCHEMA.read_text()))
    return found


def literal(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return object()  # an expression, not a literal


def restated(text: str, defaults: dict[str, list[Any]]) -> list[str]:
    """`x.<key> | default(v)` / `x['<key>'] | default(v)` where the schema gives <key> the default v."""
    out = []
    for m in DEFAULTED.finditer(text):
        key = m.group("item") or m.group("attr")
        value = literal(m.group("lit").strip())
        if key in defaults and any(value == d and type(value) is type(d) for d in defaults[key]):
            out.append(m.group(0))
    return out


def test_no_role_or_playbook_restates_a_schema_default():
    defaults = schema_defaults()
    found = {str(p.relative_to(ROOT)): hits for p in ansible_files() if (hits := restated(p.read_text(), defaults))}
    assert found == {}, "schema defaults restated (let `vilms render` fill them; read plan.json)"
    readers = [str(p.relative_to(ROOT)) for p in ansible_files() if "schema.json" in expressions(p.read_text())]
    assert readers == [], "Jinja reads the schema for its defaults (the render has filled them)"
    role_defaults = {}
    for path in (ROOT / "roles").glob("*/defaults/main.yml"):
        prefix = path.parents[1].name + "_"
        for name, value in (yaml.safe_load(path.read_text()) or {}).items():
            key = name.removeprefix(prefix).replace("_", "-")
            if key in defaults and value in defaults[key]:
                role_defaults[name] = value
    assert role_defaults == {}, "a role default restates the schema's"


# Fleet-wide inventory variables that several roles read, each through its own prefixed default in
# defaults/main.yml (`docker_engine_retries: "{{ vilms_retries | default(5) }}"`, `docker_engine_proxy:
# "{{ vilms_proxy | default({}) }}"`): allowed only there, and only
# with one and the same default everywhere (checked below), so the roles cannot drift apart.
SHARED = {"vilms_retries", "vilms_retry_delay", "vilms_proxy"}


def test_each_variable_is_defaulted_in_one_place():
    """`vilms_gpu | default(true)` stood in five places: one place gives an inventory variable its default."""
    places: dict[str, list[str]] = {}
    shared: dict[str, set[str]] = {}
    for path in ansible_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in BARE.finditer(line):
                name = m.group("name")
                if name in SHARED and path.match("roles/*/defaults/main.yml"):
                    shared.setdefault(name, set()).add(line[m.end():].split(")", 1)[0].strip())
                    continue
                places.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{number}")
    assert {n: p for n, p in places.items() if len(p) > 1} == {}
    assert {n: d for n, d in shared.items() if len(d) > 1} == {}, "roles give a shared variable different defaults"
    assert not SHARED & set(places), "a shared variable is defaulted outside the roles' defaults/main.yml"


def expressions(text: str) -> str:
    """What Ansible evaluates (Jinja and conditionals), not what it prints or documents."""
    return "\n".join(m.group(0) for m in JINJA.finditer(text))


def test_config_layers_are_merged_once_in_the_preflight():
    readers = [str(p.relative_to(ROOT)) for p in ansible_files() if LAYERS.search(expressions(p.read_text()))]
    assert readers == [str(MERGE_HOME.relative_to(ROOT))]
    home = expressions(MERGE_HOME.read_text())
    # the layers are found once (one varnames lookup), read once (one vars lookup) and merged once (one combine)
    assert [home.count(x) for x in ("ansible.builtin.varnames", "ansible.builtin.vars'", "combine(")] == [1, 1, 1]


def test_no_role_reaches_outside_itself():
    """A collection installs each role on its own: `role_path ~ '/../../schemas'` found nothing there.
    (A role README's links to its neighbours are documentation, not something the role reads.)"""
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in (ROOT / "roles").rglob("*")
                 if p.is_file() and p.suffix != ".md"
                 for line in p.read_text(errors="replace").splitlines() if "../" in line]
    assert offenders == []


@pytest.mark.parametrize("text,hits", [
    ("{{ (cfg.docker | default({}))['models-dir'] | default('./models') }}", 1),
    ("{{ cfg.docker['gateway-port'] | default(8989) }}", 1),
    ("{{ cfg.docker['gateway-port'] | default(8080) }}", 0),
    ("{{ vilms_stack_plan.weights | default([]) | length }}", 0),
])
def test_the_restatement_check_sees_what_it_should(text, hits):
    assert len(restated(text, schema_defaults())) == hits


# --- become: on the boxes, never on the controller (issue 20 item 6) -----------------------------------------------
# A task delegated to the controller inherits its play's `become: true` and would run sudo there (retag, weights fetch,
# render and its cleanup, archive IDs...). The keyword alone is not enough: an inventory's `ansible_become` in all's
# vars reaches the implicit localhost too, and a variable beats the keyword; the task's own vars beat the inventory.
CONTROLLER = {"localhost", "127.0.0.1", "::1"}
TASK_LISTS = ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always")


def task_entries(path: Path) -> Iterator[tuple[str, dict]]:
    """Every task (blocks and plays walked into) of a role's task/handler file or a playbook, with its name."""
    def walk(node: Any) -> Iterator[tuple[str, dict]]:
        for entry in node or []:
            if not isinstance(entry, dict):
                continue
            yield str(entry.get("name", "?")), entry
            for key in TASK_LISTS:
                yield from walk(entry.get(key))

    yield from walk(yaml.safe_load(path.read_text()))


def runs_on_the_controller(entry: dict) -> bool:
    return (str(entry.get("delegate_to", "")).strip() in CONTROLLER or "local_action" in entry
            or entry.get("connection") == "local" or str(entry.get("hosts", "")).strip() in CONTROLLER)


def controller_entries() -> list[tuple[str, dict]]:
    found = []
    for top in ("roles", "playbooks"):
        for path in sorted((ROOT / top).rglob("*.yml")):
            if path.parent.name in ("tasks", "handlers") or top == "playbooks":
                found += [(f"{path.relative_to(ROOT)}: {name}", entry) for name, entry in task_entries(path)
                          if runs_on_the_controller(entry)]
    return found


def test_controller_tasks_never_become():
    entries = controller_entries()
    # the check sees the tasks it is about (a walk that found nothing would pass anything)
    names = " | ".join(where for where, _ in entries)
    for known in ("Retag | Fill the engine tag", "Weights | Fetch into the controller cache", "Render | Run vilms render",
                  "Render | Remove the render's input", "Stack | Remove this run's render", "Images | Read each archive",
                  "Rollout | Hand the policy", "Transport | Is rsync on the controller"):
        assert known in names
    offenders = [where for where, entry in entries
                 if entry.get("become") is not False or (entry.get("vars") or {}).get("ansible_become") is not False]
    assert offenders == [], "controller-side tasks need `become: false` and `vars: {ansible_become: false}`"


@pytest.mark.parametrize("entry,flagged", [
    ({"delegate_to": "localhost", "ansible.builtin.command": "true"}, True),
    ({"delegate_to": "localhost", "become": False, "ansible.builtin.command": "true"}, True),  # the keyword alone
    ({"delegate_to": "localhost", "become": False, "vars": {"ansible_become": False}}, False),
    ({"local_action": {"module": "ansible.builtin.command", "cmd": "true"}}, True),
    ({"delegate_to": "{{ item }}", "ansible.builtin.set_fact": {}}, False),  # the hosts themselves
])
def test_the_become_check_sees_what_it_should(entry, flagged):
    offends = runs_on_the_controller(entry) and (
        entry.get("become") is not False or (entry.get("vars") or {}).get("ansible_become") is not False)
    assert offends == flagged
