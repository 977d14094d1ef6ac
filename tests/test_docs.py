"""The documentation says what the code does: the options page is the fields' own help, every link resolves."""

import re
from pathlib import Path

from tlm_plugin.hparams import tlm_field_names
from tlm_plugin.settings.reference import options_markdown


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_options_page_is_generated_from_the_fields():
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == options_markdown(), "regenerate it: python -m tlm_plugin.settings.reference > docs/options.md"


def test_the_options_page_lists_every_key_once():
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(tlm_[a-z0-9_]+)` \|", page, flags=re.M)
    assert sorted(rows) == sorted(tlm_field_names())


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
