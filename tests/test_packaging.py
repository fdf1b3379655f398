"""What pyproject.toml promises: every pin says why, and the optional dependencies (peft, matplotlib) stay
optional: the package imports without them, and an application that needs one says which extra to install."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tike_trl.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tike_trl"


def requirement_groups() -> dict[str, list[tuple[str, list[str]]]]:
    """pyproject's lists of requirements by key ("dependencies", each extra's name, ...): [(requirement, the
    comment lines of the block it is in)], a block being comment lines and the requirement lines after them."""
    groups: dict[str, list[tuple[str, list[str]]]] = {}
    group, comments, after_requirement = None, [], False
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):  # a new table
            group, comments = None, []
            continue
        if line.startswith("#"):
            comments = [] if after_requirement else comments
            comments.append(line)
            after_requirement = False
            continue
        if key := re.match(r"([\w-]+) = \[(.*)", line):
            group, line = key[1], key[2]
        if group is None:
            continue
        requirements = re.findall(r'"([^"]+)"', line)
        groups.setdefault(group, []).extend((r, comments) for r in requirements)
        after_requirement = after_requirement or bool(requirements)
        if line.endswith("]"):  # the list closes
            group, comments, after_requirement = None, [], False
    return groups


def test_every_pin_says_why():
    groups = requirement_groups()
    assert {"dependencies", "peft", "plot", "deepspeed", "embedded", "dev"} <= set(groups)
    assert [r for r, _ in groups["dependencies"] if r.startswith(("peft", "matplotlib"))] == []
    for name in ("requires", "dependencies", "peft", "plot", "deepspeed", "embedded"):
        for requirement, comments in groups[name]:
            assert comments, f"{requirement} ({name}) has no comment saying why"


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import in a source file."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in module_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in module_level))
    return found


def test_the_package_imports_neither_peft_nor_matplotlib_at_module_level():
    """peft reaches the library only through TRL; matplotlib only inside the functions that plot."""
    for path in PACKAGE.rglob("*.py"):
        for module, at_module_level in imports_of(path):
            assert module != "peft", f"{path.relative_to(ROOT)} imports peft"
            assert not (module == "matplotlib" and at_module_level), f"{path.relative_to(ROOT)} imports matplotlib"


def test_analyze_without_matplotlib_names_the_extra_on_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` now fails
    assert main(["analyze", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "tike-trl analyze: error: tike-trl analyze (its plots) needs matplotlib, which is not installed: "
        "pip install 'tike-trl[plot]'\n"
    )
    assert not (tmp_path / "out").exists()  # it stopped before sampling


def test_citation_cff_prefers_the_paper_the_model_card_cites():
    import yaml

    from tike_trl import model_card

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    paper = cff["preferred-citation"]
    assert (paper["title"], paper["url"], paper["year"]) == (model_card.TIKE_TITLE, model_card.TIKE_URL, 2026)
    assert [a["family-names"] for a in paper["authors"]] == ["Wang", "Jin", "Wang", "Li", "Yin", "Qiu"]
    assert {"arXiv:2504.10637", "arXiv:2506.09477"} <= {
        i["value"] for ref in cff["references"] for i in ref.get("identifiers", [])
    }


def test_the_readme_cites_tike_as_the_model_card_does():
    from tike_trl import model_card

    (bibtex,) = re.findall(r"```bibtex\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert bibtex.strip() == model_card.TIKE_CITATION
