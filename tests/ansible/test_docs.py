"""The docs stay walkable: a short README with the two commands first, a README per role whose variable table
matches the role's `meta/argument_specs.yml` and `defaults/main.yml`, and no relative link that leads nowhere.

The old README held every role's table by hand, 1,243 lines from the roles they described; a variable added to a
role's defaults (`vilms_stack_models_dir_configured`) never reached argument_specs nor the table. The tables are
now generated (`python -m devkit.role_docs`), and these tests fail when a table misses a variable, lists one that
is gone, or is stale, so a role changed in another branch is caught after the merge.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from devkit import role_docs

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200
FIRST_SCREEN = 30  # lines
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files() -> list[Path]:
    """README.md, docs/*.md (not docs/_incoming), the role READMEs and bench's: every page a newcomer follows."""
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "roles").glob("*/README.md"))]
    return [p for p in pages if p.is_file()]


def prose_lines(text: str, keep_code: bool = False) -> list[str]:
    """Lines outside fenced code blocks; inline code removed unless kept (a link inside backticks is no link,
    but a heading may contain code)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line if keep_code else re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8"), keep_code=True):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base, n = slug(m.group(1)), 0
            while (name := base if n == 0 else f"{base}-{n}") in found:
                n += 1
            found.add(name)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` whose file is missing, or whose #anchor names no heading of its target page."""
    broken = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: ({target})"
            if not dest.exists():
                broken.append(f"{where} -> no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} -> no heading #{anchor} in {dest.name}")
    return broken


# --- README ---------------------------------------------------------------------------------------------------

def test_readme_is_short_with_the_two_commands_on_the_first_screen() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (limit {README_MAX_LINES}): " \
                                           "move the topic into docs/"
    first = "\n".join(lines[:FIRST_SCREEN])
    assert re.search(r"^make demo\b", first, re.MULTILINE) and re.search(r"^make test\b", first, re.MULTILINE), \
        f"`make demo` and `make test` must be in README.md's first {FIRST_SCREEN} lines"


def test_readme_names_the_stand_ins_and_maps_every_doc() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Stand-ins" in text
    for module in ("devkit/tiny_model.py", "devkit/ollama_standin.py", "devkit/vllm_standin.py",
                   "devkit/openai_standin.py", "devkit/hub_standin.py"):
        assert module in text, f"README.md's stand-ins list lost {module}"
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in text]
    assert not missing, f"README.md's map of docs/ does not link {missing}"


# --- links ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The `plan.json`, in short\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#the-planjson-in-short) [gone](docs/b.md) [bad](docs/a.md#nope) "
                    "[web](https://example.com/x.md) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n[self](#missing)\n", encoding="utf-8")
    found = broken_links(page, tmp_path)
    assert found == ["README.md: (docs/b.md) -> no such file",
                     "README.md: (docs/a.md#nope) -> no heading #nope in a.md",
                     "README.md: (#missing) -> no heading #missing in README.md"]


# --- role READMEs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", role_docs.roles(), ids=lambda p: p.name)
def test_every_role_has_a_readme_whose_table_matches_its_variables(role: Path) -> None:
    problems = role_docs.check_role(role)
    assert not problems, "\n".join(problems) + "\n(run `python -m devkit.role_docs` to regenerate the tables)"


def test_every_default_is_declared_in_argument_specs() -> None:
    """ansible-core checks arguments against argument_specs only: a default missing there is never validated."""
    undeclared = [f"{role.name}: {var.name}" for role in role_docs.roles()
                  for var in role_docs.role_variables(role).values() if not var.spec]
    assert not undeclared, undeclared


def _role(root: Path, defaults: str, specs: str) -> Path:
    role = root / "roles" / "demo_role"
    (role / "defaults").mkdir(parents=True)
    (role / "meta").mkdir()
    (role / "tasks").mkdir()
    (role / "defaults" / "main.yml").write_text(defaults, encoding="utf-8")
    (role / "meta" / "argument_specs.yml").write_text(specs, encoding="utf-8")
    return role


SPECS = """argument_specs:
  main:
    short_description: A demo role.
    options:
      demo_role_a: {type: int, default: 1, description: The first.}
      demo_role_b: {type: list, elements: str, description: The second.}
"""


def test_the_table_check_catches_a_missing_a_gone_and_a_stale_variable(tmp_path: Path) -> None:
    role = _role(tmp_path, "demo_role_a: 1\ndemo_role_b: [x]\n", SPECS)
    assert role_docs.check_role(role) == ["demo_role: no README.md"]
    assert role_docs.write_role(role) and not role_docs.write_role(role)  # written once, then unchanged
    assert role_docs.check_role(role) == []
    assert role_docs.table_names((role / "README.md").read_text()) == ["demo_role_a", "demo_role_b"]

    (role / "defaults" / "main.yml").write_text("demo_role_a: 1\ndemo_role_b: [x]\ndemo_role_c: on\n")
    assert role_docs.check_role(role) == ["demo_role: README table misses demo_role_c"]
    (role / "defaults" / "main.yml").write_text("demo_role_a: 1\n")
    (role / "meta" / "argument_specs.yml").write_text(SPECS.replace("demo_role_b", "demo_role_renamed"))
    assert role_docs.check_role(role) == ["demo_role: README table misses demo_role_renamed",
                                          "demo_role: README table lists demo_role_b, which no longer exists"]
    (role / "meta" / "argument_specs.yml").write_text(SPECS)
    (role / "defaults" / "main.yml").write_text("demo_role_a: 2\ndemo_role_b: [x]\n")
    assert role_docs.check_role(role) == ["demo_role: README table is stale (defaults or descriptions changed)"]


def test_regenerating_keeps_the_hand_written_prose(tmp_path: Path) -> None:
    role = _role(tmp_path, "demo_role_a: 1\n", SPECS)
    table = role_docs.render_table(role)
    (role / "README.md").write_text(f"# demo_role\n\nProse before.\n\n{table}\n\nProse after.\n")
    (role / "defaults" / "main.yml").write_text("demo_role_a: 5\n")
    assert role_docs.write_role(role)
    text = (role / "README.md").read_text()
    assert text.startswith("# demo_role\n\nProse before.\n\n") and text.endswith("\n\nProse after.\n")
    assert "| `demo_role_a` | `5` | int | main | The first. |" in text
    assert role_docs.check_role(role) == []
