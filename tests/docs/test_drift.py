"""The README and docs/ cannot drift from the code: every `--flag` they give a `python -m` command of the
project or a `bench/` script is in that command's `--help`, every `CHARRNN_*` variable they name is read
somewhere, every relative link and #anchor resolves, and every `make` target they name exists.

Anchors follow the site's slug rule (mkdocs.yml: toc with pymdownx.slugs, case lower), which is GitHub's,
so one check holds for both.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import pytest
from pymdownx.slugs import slugify
from support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STAGES = ("train", "export", "serve")  # the project's `python -m` packages
SLUG = slugify(case="lower")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)  # an indented code block (deployment.md's commands)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
SEPARATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str) -> list[str]:
    """The fenced blocks' bodies (the fence lines dropped) and the indented blocks outside them."""
    fenced = [m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] for m in FENCE.finditer(text)]
    rest = FENCE.sub("", text)
    indented = [m.group(0) for m in INDENTED.finditer(rest) if not m.group(0).lstrip().startswith(("-", "|"))]
    return fenced + indented


def prose(text: str) -> str:
    """The text outside code blocks and inline code: where links are links."""
    text = FENCE.sub("", text)
    text = re.sub(r"(?:^(?: {4}|\t)(?![-*] |\d+\. ).*\n?)+", "", text, flags=re.M)  # indented code, not lists
    return INLINE.sub("", text)


def commands(text: str) -> list[str]:
    """Command lines: each line of a code block (continuations joined, a leading `$ ` dropped), and each
    inline code span."""
    found = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(re.sub(r"^\s*\$\s+", "", line))
    found += [m.group(2).replace("\n", " ") for m in INLINE.finditer(FENCE.sub("", text))]
    return found


def words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a line of output: plain words are enough here
        return line.split()


def invocations(line: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """Each project command in a line: (the command as run with --help, the --flags given it)."""
    tokens = words(line)
    found = []
    for i, token in enumerate(tokens):
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].split(".")[0] in STAGES:
            command, start = ("-m", tokens[i + 1]), i + 2
        elif re.fullmatch(r"(\./)?bench/\w+\.py", token):
            command, start = (token,), i + 1
        else:
            continue
        args = []
        for word in tokens[start:]:
            if word in SEPARATORS or word == "-m" or re.fullmatch(r"(\./)?bench/\w+\.py", word):
                break
            args.append(word)
        flags = [a.split("=", 1)[0] for a in args if re.fullmatch(r"--[a-z][\w-]*(=.*)?", a)]
        if flags:
            found.append((command, args, flags))
    return [(with_subcommand(command, args), flags) for command, args, flags in found]


@functools.cache
def help_text(command: tuple[str, ...]) -> str:
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{' '.join(command)} --help exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def with_subcommand(command: tuple[str, ...], args: list[str]) -> tuple[str, ...]:
    """`python -m serve.client generate --target ...`: the flags are the subcommand's."""
    positional = next((a for a in args if not a.startswith("-")), None)
    if positional and re.search(r"\{[\w,-]*\b" + re.escape(positional) + r"\b[\w,-]*\}", help_text(command)):
        return (*command, positional)
    return command


def test_every_flag_the_docs_give_a_command_is_in_its_help():
    given = [(page, command, flags) for page in PAGES for line in commands(page.read_text())
             for command, flags in invocations(line)]
    with ThreadPoolExecutor(4) as pool:  # each --help is a Python start-up (train's imports torch)
        list(pool.map(help_text, {command for _, command, _ in given}))
    wrong = []
    checked = 0
    for page, command, flags in given:
        known = set(re.findall(r"--[a-z][\w-]*", help_text(command)))
        checked += len(flags)
        wrong += [f"{rel(page)}: {' '.join(command)} {flag}" for flag in flags if flag not in known]
    assert checked > 100, checked  # the parser still finds the docs' commands
    assert not wrong, "flags the command does not take:\n" + "\n".join(wrong)


def test_every_variable_the_docs_name_is_read():
    from serve.ops.settings import PREFIX, Settings

    read = {PREFIX + f.name.upper() for f in fields(Settings)}  # built from the field names at run time
    sources = [p for pattern in ("*.py", "*.yml", "*.yaml", "*.sh", "*Dockerfile*", "Makefile", "*.conf")
               for p in ROOT.rglob(pattern)]
    code = "\n".join(p.read_text(errors="replace") for p in sources
                     if p.is_file() and not {"docs", "node_modules", ".venv", ".venv-triton", "site"} & set(
                         p.relative_to(ROOT).parts[:1] + p.relative_to(ROOT).parts[-2:-1])
                     and p != Path(__file__))
    unread = sorted({f"{rel(page)}: {name}" for page in PAGES
                     for name in re.findall(r"CHARRNN_[A-Z0-9_]*[A-Z0-9]", page.read_text())
                     if name not in read and not re.search(rf"\b{name}\b", code)})
    assert not unread, "variables nothing reads:\n" + "\n".join(unread)


def heading_slugs(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    slugs = []
    for match in HEADING.finditer(text):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link's text
        title = title.replace("`", "").replace("*", "")
        slugs.append(SLUG(title, "-"))
    return slugs


def test_no_page_has_two_headings_with_one_slug():
    """GitHub and the toc number a repeated slug differently (-1 against _1): keep them unique."""
    repeated = [f"{rel(page)}: #{slug}" for page in PAGES
                for slug in sorted(set(s for s in heading_slugs(page) if heading_slugs(page).count(s) > 1))]
    assert not repeated, repeated


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{rel(page)}: {target}: no such file")
            elif page.parent.name == "docs" and path and not file.is_file():
                broken.append(f"{rel(page)}: {target}: a folder (the site has no page for it)")
            elif anchor and (file.suffix != ".md" or anchor not in heading_slugs(file)):
                broken.append(f"{rel(page)}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_every_make_target_named_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", makefile, re.M))
    missing = []
    for page in PAGES:
        for line in commands(page.read_text()):
            for target in re.findall(r"(?:^|[\s;&|(])make ([a-z][\w-]*)", line):
                if target not in targets:
                    missing.append(f"{rel(page)}: make {target}")
    assert not missing, missing


@pytest.mark.parametrize("line, expected", [
    ("$ python -m train --corpus x --out y && python -m export y", [(("-m", "train"), ["--corpus", "--out"])]),
    ("torchrun --nnodes 2 -m train --steps 3 --resume=auto", [(("-m", "train"), ["--steps", "--resume"])]),
    (".venv/bin/python bench/serve.py --before /tmp/b --only batched  # a comment --not-a-flag",
     [(("bench/serve.py",), ["--before", "--only"])]),
])
def test_the_parser_finds_commands_and_their_flags(line, expected):
    assert invocations(line) == expected
