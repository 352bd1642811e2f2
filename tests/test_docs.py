"""Every citation in the code, configs and README points into the repository's own docs/."""

from __future__ import annotations

import re

from tests.helpers import ROOT

CITE = re.compile(r"docs/([a-z_]+)\.md(?: (\d+(?:\.\d+)?))?")  # any page of docs/, and its section


def _sources():
    for folder in ("unlearn_exp", "conf", "tests"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md"))
    yield ROOT / "README.md"


def _sections(name: str) -> set[str]:
    text = (ROOT / "docs" / f"{name}.md").read_text()
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.?\s", text, re.M)}


def test_citations_point_to_existing_sections():
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    sections = {name: _sections(name) for name in pages}
    missing = []
    for path in _sources():
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        assert "METHOD.md" not in text and "DESIGN.md" not in text, path
        for m in CITE.finditer(text):
            name, number = m.group(1), m.group(2)
            if name not in pages:  # a page the code or configs cite must exist
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}.md does not exist")
            elif number and sections[name] and number.rstrip(".") not in sections[name]:
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}.md {number}")
    assert not missing, missing
    assert sections["methods"] >= {"1.2", "3.2", "4.2", "5.3", "6.1", "7.2", "7.4", "8.1", "8.2"}


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """Markdown links to files of the repository (not web addresses) point at files that exist."""
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
