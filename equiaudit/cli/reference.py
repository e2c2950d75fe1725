"""The command-line reference (``docs/cli.md``), generated from the commands themselves.

Typer builds a click group from :data:`equiaudit.cli.main.app`; this walks it (each command's
usage, help, epilog and parameters: names, type, default, help) and writes Markdown, so the
reference cannot drift from the code. The docs build calls it through a mkdocs hook
(``docs/_hooks/cli_reference.py``); ``python -m equiaudit.cli.reference`` prints it.
"""

from __future__ import annotations

__all__ = ["cli_reference"]


def _cell(text: object) -> str:
    """Text for a Markdown table cell: pipes escaped, one line."""
    return " ".join(str(text).replace("|", "\\|").split())


def _is_flag(param) -> bool:
    return param.param_type_name == "option" and bool(getattr(param, "is_flag", False))


def _type(param, context) -> str:
    """Typer's own type label (``<int>``, ``<auto|cpu|cuda>``), or ``switch`` for a flag."""
    if _is_flag(param):
        return "switch"
    label = str(param.display_type(context) or "").strip("<>")
    return _cell(label)


def _default(param) -> str:
    default = param.default
    if default is None or (_is_flag(param) and default is False and not param.secondary_opts):
        return ""
    if hasattr(default, "value"):  # an Enum
        default = default.value
    if _is_flag(param) and param.secondary_opts:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if _is_flag(param):
        return ""
    return f"`{default}`"


def _names(param) -> str:
    if param.param_type_name == "argument":
        suffix = "..." if param.nargs == -1 else ""
        return f"`{param.name.upper()}{suffix}`" + ("" if param.required else " (optional)")
    names = [*param.opts, *param.secondary_opts]
    metavar = "" if _is_flag(param) else f" {param.metavar}" if param.metavar else ""
    return ", ".join(f"`{n}{metavar if n.startswith('--') else ''}`" for n in names)


def _text(text: str | None) -> str:
    """A help or epilog text as Markdown: click's ``\\b`` (keep these lines) becomes a code block."""
    if not text:
        return ""
    out = []
    for paragraph in text.strip().split("\n\n"):
        if paragraph.startswith("\b"):
            out.append("```text\n" + paragraph.removeprefix("\b").strip("\n") + "\n```")
        else:
            out.append(" ".join(paragraph.split()))
    return "\n\n".join(out)


def cli_reference() -> str:
    """Markdown for every command of ``equiaudit``: usage, help, epilog, a parameter table."""
    import typer
    from typer import _click as click  # typer >= 0.2x carries its own click

    from equiaudit.cli.main import app

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="equiaudit")
    lines = ["Every command and option, generated from the commands' own definitions at each docs build.",
             "`equiaudit COMMAND -h` prints the same in the terminal.", ""]
    lines += ["## Global options", "", "| option | type | default | what it does |", "| --- | --- | --- | --- |"]
    for param in group.params:
        if getattr(param, "hidden", False):
            continue
        lines.append(f"| {_names(param)} | {_type(param, root)} | {_default(param)} | {_cell(param.help or '')} |")
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        if command is None or command.hidden:
            continue
        context = click.Context(command, info_name=name, parent=root)
        usage = " ".join(command.collect_usage_pieces(context))
        lines += ["", f"## equiaudit {name}", "", "```text", f"equiaudit {name} {usage}", "```", ""]
        lines += [_text(command.help), ""]
        if command.epilog:
            lines += [_text(command.epilog), ""]
        lines += ["| parameter | type | default | what it does |", "| --- | --- | --- | --- |"]
        for param in command.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            lines.append(f"| {_names(param)} | {_type(param, context)} | {_default(param)} | "
                         f"{_cell(getattr(param, 'help', '') or '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(cli_reference(), end="")
