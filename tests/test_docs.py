"""The README and the guides under docs/: every relative link points to a file that exists and,
with a ``#anchor``, to a heading of that file (GitHub's anchors); every ``transferkit COMMAND``
they write names a command that exists and only flags it takes; the README keeps the commands
CI runs as its set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation other than hyphens
    and underscores removed, spaces to hyphens; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for title in HEADING.findall(prose(path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    return LINK.findall(CODE_SPAN.sub("``", prose(path.read_text())))


def test_the_readme_and_the_guides_exist_and_link_to_each_other():
    assert (ROOT / "docs" / "README.md") in PAGES
    assert any(target.startswith("docs/") for target in links(ROOT / "README.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not this repository's
            continue
        name, _, anchor = target.partition("#")
        path = (page.parent / name).resolve() if name else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_holds_the_set_up_and_test_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for label in ("# The README's set-up command:", "# The README's test command:"):
        command = ci[ci.index(label) + 1].strip()
        assert command in readme, f"{label} {command!r} is not in README.md"


# ``transferkit [-q|-v|...] COMMAND ARGS`` in a code block (continued lines joined) or a code span.
COMMAND_LINE = re.compile(r"(?<![\w.])transferkit((?:[ \t]+-[\w-]+)*)[ \t]+([a-z][\w-]*)([^`\n|#;&]*)")
FLAG = re.compile(r"(?<![\w./=-])(--?[a-zA-Z][\w-]*)")


def commands_written(path: Path) -> list[tuple[str, str]]:
    """Each ``transferkit`` command line of a page, as (command, the rest of the line)."""
    text = path.read_text()
    code = [block.replace("\\\n", " ") for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]
    code += [span.strip("`") for span in CODE_SPAN.findall(prose(text))]
    return [(match.group(2), match.group(1) + match.group(3)) for piece in code
            for match in COMMAND_LINE.finditer(piece)]


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "README.md"],
                         ids=lambda page: str(page.relative_to(ROOT)))
def test_every_command_written_exists_with_the_flags_written(page):
    import typer.main

    from transferkit.cli import app

    group = typer.main.get_command(app)
    assert "finetune" in group.commands

    def flags(command) -> set[str]:
        return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}

    wrong = []
    for name, rest in commands_written(page):
        command = group.commands.get(name)
        if command is None:
            # prose such as "transferkit runs ..." is not a command line; a command line is
            # followed by a path or a flag
            if rest.strip() and not rest.strip()[0].isalpha():
                wrong.append(f"transferkit {name}: no such command")
            continue
        unknown = [flag for flag in FLAG.findall(rest) if flag not in flags(command) | flags(group)]
        wrong += [f"transferkit {name} {flag}: no such flag" for flag in unknown]
    assert not wrong, f"{page.relative_to(ROOT)}: " + "; ".join(sorted(set(wrong)))
