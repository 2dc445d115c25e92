"""``.. gradcomp-cli:: module:function``: the options of one ``gradcomp`` command, read from its argparse parser.

The function is the one that builds the command's parser and parses ``argv`` (``gradcomp.demo:parse_args``,
``gradcomp.benchmarks.kernels:main``, ...). It is called with an empty ``argv`` while
``ArgumentParser.parse_args`` is replaced by a stub that hands back the parser before anything
runs, so the page lists exactly the options, defaults and help texts the command has.
Used from an ``{eval-rst}`` block: it emits reStructuredText (``.. program::`` and ``.. option::``).
"""

from __future__ import annotations

import argparse
import importlib
from unittest import mock

from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _capture(parser, *args, **kwargs):
    raise _Captured(parser)


def parser_of(target: str) -> argparse.ArgumentParser:
    """The parser ``module:function`` builds, captured at its ``parse_args`` call."""
    module_name, _, func_name = target.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture):
        try:
            func([])
        except _Captured as got:
            return got.parser
    raise RuntimeError(f"gradcomp-cli: {target}([]) returned without calling ArgumentParser.parse_args")


def _escape(text: str) -> str:
    """Plain text as reStructuredText: markup characters stay literal."""
    for ch in ("\\", "*", "`", "_", "|"):
        text = text.replace(ch, "\\" + ch)
    return text


def _rst_lines(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines = [f".. program:: {parser.prog}", ""]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        default = action.default
        show_default = (default is not None and default is not False and default is not argparse.SUPPRESS
                        and not isinstance(action, argparse._StoreTrueAction) and "default" not in help_text.lower())
        lines += [f".. option:: {invocation}", ""]
        body = _escape(help_text.strip()) if help_text else ""
        if show_default:
            body = f"{body} (default ``{default!r}``)" if body else f"Default: ``{default!r}``."
        if not body:
            body = "(no description)"
        lines += ["   " + body, ""]
    return lines


class GradcompCli(SphinxDirective):
    required_arguments = 1
    option_spec = {"description": directives.flag}

    def run(self):
        parser = parser_of(self.arguments[0])
        lines = []
        if "description" in self.options and parser.description:
            lines += [_escape(parser.description.strip()), ""]
        lines += _rst_lines(parser)
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app):
    app.add_directive("gradcomp-cli", GradcompCli)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
