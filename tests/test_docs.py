"""The README and docs/ stay true: the CLI reference is the generated one, the README fits its
budget, no link leaves the repository, and every documented command names a real subcommand."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "traces").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
URL = re.compile(r"\b(?:https?|ftp)://|\bwww\.")
CODE_BLOCK = re.compile(r"```.*?```", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # commands may name addresses (localhost, a Ray head): not links
# Documented before their code lands (the README's Serving section); once one exists,
# test_planned_commands_are_still_planned fails until it is taken off this list.
PLANNED = {("moe-runtime", "serve")}


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", CODE_BLOCK.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _fenced_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def test_cli_reference_is_generated():
    assert (ROOT / "docs" / "cli.md").read_text() == reference.generate(), \
        "docs/cli.md is stale: run python3 docs/cli_reference.py"


def test_reference_lists_every_subcommand_and_flag():
    text = reference.generate()
    assert "### `moe-runtime generate`" in text and "### `moe-sim sweep`" in text
    assert "### `moe-trace synth`" in text
    assert "`--expert-budget BUDGET`" in text and "`--budget" not in text  # old spellings stay hidden
    assert reference.main(["--check"]) == 0


def test_readme_fits_its_budget():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_leaves_the_repository(path):
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    prose = CODE.sub("", text)
    assert not URL.search(prose), f"{path.name}: link outside the repository: {URL.search(prose)}"
    for target in LINK.findall(text):
        assert "://" not in target and not target.startswith("mailto:"), f"{path.name}: {target}"
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        assert file.is_relative_to(ROOT) and file.exists(), f"{path.name}: broken link {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{path.name}: no heading for {target}"


def _subcommands() -> dict[str, set[str]]:
    return {prog: set(reference.subcommands(importlib.import_module(mod).build_parser()))
            for prog, mod in reference.PROGRAMS.items()}


def test_planned_commands_are_still_planned():
    subs = _subcommands()
    assert not [f"{p} {n}" for p, n in PLANNED if n in subs[p]], "it exists now: remove it from PLANNED"


def test_documented_commands_name_real_subcommands():
    subs = _subcommands()
    for prog, name in PLANNED:
        subs[prog] = subs[prog] | {name}
    seen = 0
    for path in DOCS:
        for line in _fenced_lines(path.read_text()):
            words = line.split()
            if words and words[0] in subs:
                seen += 1
                assert len(words) > 1 and (words[1] in subs[words[0]] or words[1] == "--help"), \
                    f"{path.name}: {line.strip()}"
    assert seen >= 10


def test_python_examples_run(tmp_path, monkeypatch):
    """Each ```python block of the docs runs as written, in a folder where `make-tiny` made its checkpoint."""
    from moe_runtime.model.tiny import write_tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    write_tiny_checkpoint("mixtral", tmp_path / "out" / "tiny-mixtral")
    blocks = [(p, b) for p in DOCS for b in re.findall(r"```python\n(.*?)```", p.read_text(), re.S)]
    assert blocks
    for path, block in blocks:
        scope: dict = {}
        exec(compile(block, f"{path.name} example", "exec"), scope)  # noqa: S102  (our own docs)
        assert scope["res"].token_ids, path.name
