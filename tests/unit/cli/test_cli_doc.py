"""docs/cli.md and the parser agree: every synopsis line in the doc's code blocks parses
with ``build_parser()`` (with no optional part, with each alternative, with all of them),
and every command the parser has is documented there."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.cli.main import build_parser, split_rest

DOC = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
TLS_OPTIONS = ["--tls-cert", "C", "--tls-key", "K", "--tls-ca", "CA"]

Item = str | list[list[str]]
"""A literal word, or an optional group: its alternatives, each a list of words."""


def synopses() -> list[str]:
    """The ``ferry ...`` lines of the doc's code blocks (continuation lines joined)."""
    lines: list[str] = []
    in_block = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if line.startswith("ferry "):
            lines.append(line.strip())
        elif line.startswith(" ") and lines and line.strip().startswith("["):
            lines[-1] += " " + line.strip()
    return lines


def _words(text: str) -> list[str]:
    text = text.replace("TLS options", " ".join(TLS_OPTIONS))
    return [w.removesuffix("...") for w in text.split() if w != "..."]


def parse_synopsis(line: str) -> list[Item]:
    items: list[Item] = []
    for part in re.split(r"(\[[^\]]*\](?:\.\.\.)?)", line):
        if part.startswith("["):
            body = part.removesuffix("...")[1:-1]
            items.append([_words(alt) for alt in body.split("|")])
        else:
            items.extend(_words(part))
    return items


def variants(items: list[Item]) -> Iterator[list[str]]:
    """Required words only; each optional group's alternative alone; every group at once."""

    def build(choose: dict[int, int]) -> list[str]:
        out: list[str] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                out.append(item)
            elif i in choose:
                out.extend(item[choose[i]])
        return out

    groups = [i for i, item in enumerate(items) if not isinstance(item, str)]
    yield build({})
    for i in groups:
        item = items[i]
        assert not isinstance(item, str)
        for alt in range(len(item)):
            yield build({i: alt})
    yield build(dict.fromkeys(groups, 0))


CASES = [(line, argv) for line in synopses() for argv in variants(parse_synopsis(line))]


def test_the_doc_has_synopses() -> None:
    assert len(synopses()) >= 20


@pytest.mark.parametrize(("line", "argv"), CASES,
                         ids=[" ".join(argv) for _, argv in CASES])
def test_documented_command_lines_parse(line: str, argv: list[str]) -> None:
    assert argv[0] == "ferry"
    head, rest = split_rest(argv[1:])
    try:
        args = build_parser().parse_args(head)
    except SystemExit as exc:
        pytest.fail(f"docs/cli.md: {' '.join(argv)!r} does not parse (exit {exc.code})")
    assert not rest or getattr(args, "takes_rest", False)


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = f"{prefix} {name}"
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, words)
                else:
                    yield words


def test_every_command_is_documented() -> None:
    documented = synopses()
    missing = [c for c in _commands(build_parser(), "ferry")
               if not any(line == c or line.startswith(c + " ") for line in documented)]
    assert missing == []
