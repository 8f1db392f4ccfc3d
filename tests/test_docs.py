"""The repository documents itself: no pointer to files outside it, and docs/methods.md covers every card.

Code, cards, tests, benchmarks and docs cite papers (arXiv id, section, equation), released code, or
our own ``docs/methods.md``; a reader must be able to follow every reference. The forbidden names
are assembled from pieces so that this file does not contain them itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs/methods.md"
BARE = "methods" + ".md"  # the bare file name, spelled so that this file never writes it alone
SCANNED = ("kvframe", "registry", "tests", "benchmarks", "docs", "configs", "README.md", "CONTRIBUTING.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".json", ".csv", ".rst"}

# names of files that live outside the repository (matched case-insensitively)
OUTSIDE = ("DESIGN" + ".md", "anchors" + ".md", ".." + "/" + "shared", "/work" + "/" + "shared")
SECTION_SIGN = "\u00a7"
# a path token ending in BARE: group 1 is its directory part ("" or ending in "/"), or the start of another file name
METHODS_REF = re.compile(r"(?<![\w./-])([\w./-]*?)methods\.md")
ANCHOR_REF = re.compile(r"(?<![\w./-])([\w./-]*?)methods\.md#([\w-]+)")


def _files() -> list[Path]:
    out = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            out.append(path)
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts and ".egg-info" not in str(f):
                out.append(f)
    return out


def _points_to_methods_doc(prefix: str, where: Path) -> bool:
    """Whether ``prefix + BARE`` written in file ``where`` names docs/methods.md."""
    if prefix == "docs/":  # repository-relative, the convention in code, cards and tests
        return True
    return (where.parent / (prefix + BARE)).resolve() == METHODS_DOC  # a relative Markdown link


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    """Anchors of the headings of ``doc`` (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    counts: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.+)", line)
        if m:
            base = _slug(m.group(1))
            n = counts.get(base, 0)
            anchors.add(base if n == 0 else f"{base}-{n}")
            counts[base] = n + 1
    return anchors


def test_nothing_points_outside_the_repository():
    bad = []
    for f in _files():
        text = f.read_text(encoding="utf-8", errors="replace")
        low = text.lower()
        for name in OUTSIDE:
            if name.lower() in low:
                bad.append(f"{f.relative_to(ROOT)}: mentions {name!r}")
        if SECTION_SIGN in text:
            bad.append(f"{f.relative_to(ROOT)}: uses the section sign (cite the paper's Sec./Eq. instead)")
        for m in METHODS_REF.finditer(text):
            prefix = m.group(1)
            if prefix and not prefix.endswith("/"):
                continue  # another file whose name ends in BARE (benchmarks' seed-methods results)
            if not _points_to_methods_doc(prefix, f):
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{f.relative_to(ROOT)}:{line}: {m.group(0)!r} is not docs/methods.md")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_methods_doc_links_resolve():
    anchors = _anchors(METHODS_DOC)
    bad = []
    for f in _files():
        text = f.read_text(encoding="utf-8", errors="replace")
        refs = [(m.group(1), m.group(2)) for m in ANCHOR_REF.finditer(text)]
        if f == METHODS_DOC:
            refs += [("", a) for a in re.findall(r"\]\(#([\w-]+)\)", text)]
        for prefix, anchor in refs:
            if (prefix == "" and f == METHODS_DOC) or _points_to_methods_doc(prefix, f):
                if anchor not in anchors:
                    bad.append(f"{f.relative_to(ROOT)}: #{anchor}")
    assert not bad, f"links to docs/methods.md headings that do not exist: {bad}; headings: {sorted(anchors)}"


def test_methods_doc_covers_every_card():
    doc = METHODS_DOC.read_text(encoding="utf-8")
    cards = sorted(
        yaml.safe_load(p.read_text(encoding="utf-8")).get("name", p.stem) for p in (ROOT / "registry").glob("*.yaml")
    )
    assert cards, "no cards found in registry/"
    missing = [name for name in cards if f"`{name}`" not in doc]
    assert not missing, f"cards not described in docs/methods.md: {missing}"


def test_readme_and_architecture_link_the_methods_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = next(line for line in readme.splitlines() if line.startswith("## Methods"))
    assert "(docs/methods.md)" in heading, heading
    assert "(" + BARE + ")" in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_checks_catch_what_they_should():
    """The scanners themselves: bare or foreign paths to BARE are caught, our own links are not."""
    here = ROOT / "kvframe" / "policies" / "x.py"
    in_docs = ROOT / "docs" / "architecture.md"
    cases = {
        ("see docs/" + BARE + "#asymkv", here): True,
        ("see [m](" + BARE + ")", in_docs): True,
        ("see " + BARE + " section 1.2", here): False,
        ("see ../" + BARE, in_docs): False,
        ("see other/docs/" + BARE, here): False,
    }
    for (text, where), ok in cases.items():
        refs = [m.group(1) for m in METHODS_REF.finditer(text)]
        assert refs, text
        assert all(_points_to_methods_doc(p, where) for p in refs) == ok, text
    assert [m.group(1) for m in METHODS_REF.finditer("results/seed_" + BARE)] == ["results/seed_"]
    assert _slug("Weights, values and logit bias") == "weights-values-and-logit-bias"
    assert _slug("AsymKV choices") == "asymkv-choices"
