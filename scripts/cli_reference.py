"""Write the CLI section of docs/reference.md from the parser itself, so the reference lists every command
and option as `flatstack --help` has them.

    .venv/bin/python scripts/cli_reference.py          # rewrite the section between the markers
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if the section is not current
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
BEGIN = "<!-- cli:begin (written by scripts/cli_reference.py; edit the parser, then rerun it) -->"
END = "<!-- cli:end -->"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def default_of(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return ""
    d = action.default
    if d is None or d == argparse.SUPPRESS or d == [] or d == "":
        return ""
    if isinstance(d, int) and not isinstance(d, bool) and d >= 1 << 20:
        for suffix, unit in (("G", 1 << 30), ("M", 1 << 20)):
            if d % unit == 0:  # sizes as the options take them: 1G, 4M
                d = f"{d // unit}{suffix}"
                break
    if isinstance(d, list):
        d = " ".join(map(str, d))
    return f"`{d}`"


def help_of(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "default": action.default}
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text = (text + "; " if text else "") + "one of " + ", ".join(f"`{c}`" for c in action.choices)
    return cell(text)


def metavar_of(action: argparse.Action) -> str:
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        return " ".join(metavar)
    if action.nargs == "+":
        return f"{metavar} [{metavar} ...]"
    if action.nargs == "?":
        return f"[{metavar}]"
    return metavar


def option_name(action: argparse.Action) -> str:
    first, *others = action.option_strings
    if action.nargs != 0:
        first = f"{first} {metavar_of(action)}"
    return ", ".join(f"`{s}`" for s in [first, *others])


def command_section(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"### `flatstack {name}`", "", cell(summary[:1].upper() + summary[1:]) + ".", ""]
    positionals = [a for a in parser._actions if not a.option_strings]
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    usage = " ".join([f"flatstack {name}"] + [metavar_of(a) for a in positionals] + ["[options]"])
    lines += ["```", usage, "```", ""]
    rows = [(f"`{metavar_of(a)}`", "", help_of(a)) for a in positionals]
    rows += [(option_name(a) + (" (required)" if a.required else ""), default_of(a), help_of(a)) for a in options]
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|"]
        lines += [f"| {n} | {d} | {h} |" for n, d, h in rows]
        lines.append("")
    if parser.epilog:
        lines += [cell(parser.epilog), ""]
    return lines


def generate() -> str:
    sys.path.insert(0, str(ROOT))
    from flatstack.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help or "" for c in sub._choices_actions}
    lines = [BEGIN, ""]
    for name, p in sub.choices.items():
        lines += command_section(name, p, summaries.get(name, ""))
    lines.append(END)
    return "\n".join(lines)


def current_section(text: str) -> tuple[int, int]:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{REFERENCE}: the markers {BEGIN!r} and {END!r} are missing")
    return start, end + len(END)


def main() -> int:
    check = "--check" in sys.argv[1:]
    text = REFERENCE.read_text(encoding="utf-8")
    start, end = current_section(text)
    new = text[:start] + generate() + text[end:]
    if check:
        if new != text:
            print(f"{REFERENCE.relative_to(ROOT)} is not current: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
