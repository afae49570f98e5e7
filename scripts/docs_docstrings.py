"""A griffe extension for the documentation site: omnifix's docstrings, as Markdown.

The docstrings are written to read well in ``help()`` and to run as doctests: Sphinx roles
(``:func:`name```), reST literal blocks (``text::`` and an indented block) and bare ``>>>``
examples. mkdocstrings renders docstrings as Markdown, where a role shows its colon syntax, a
literal block becomes a paragraph and a doctest becomes nested quotes (``>>>``). This turns
each into its Markdown form before griffe parses the sections; the docstrings stay as they are.

Used by mkdocs.yml (``extensions:`` of the mkdocstrings python handler); scripts/docs.sh builds.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`name`, :class:`~torch.device` (the tilde shows the last component only).
_ROLE = re.compile(r":(?:py:)?(?:attr|class|const|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")
_DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:\s*[+-]\w+(?:\s*,\s*[+-]\w+)*\s*$")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_doctests(lines: list[str]) -> list[str]:
    """Wrap each run of ``>>>``/``...`` lines and their output in a ```` ```pycon ```` fence."""
    out: list[str] = []
    fenced = False  # inside a fence already (a converted literal block, say)
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.lstrip().startswith(">>>"):
            out.append(line)
            index += 1
            continue
        margin = " " * _indent(line)
        block = []
        # A doctest example runs to the next blank line (its expected output included).
        while index < len(lines) and lines[index].strip():
            block.append(_DOCTEST_FLAGS.sub("", lines[index]))
            index += 1
        out += [f"{margin}```pycon", *block, f"{margin}```"]
    return out


def _fence_literal_blocks(lines: list[str]) -> list[str]:
    """A reST ``text::`` and indented block: ``text:`` and a ```` ```python ```` fence."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        base = _indent(line)
        end = index
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
            end += 1
        while end > index and not lines[end - 1].strip():  # trailing blanks separate, keep them
            end -= 1
        code = [row for row in lines[index:end] if row.strip()]
        if not line.rstrip().endswith("::") or not code:
            out.append(line)
            continue
        depth = min(_indent(row) for row in code)
        margin = " " * base
        body = [margin + row[depth:] if row.strip() else "" for row in lines[index:end]]
        while body and not body[0]:
            body.pop(0)
        text = line.rstrip()[:-1]  # "text::" reads "text:"; a lone "::" goes
        out += [
            text if text.strip() != ":" else "",
            "",
            f"{margin}```python",
            *body,
            f"{margin}```",
        ]
        index = end
    return out


def to_markdown(text: str) -> str:
    r"""Sphinx roles, reST literal blocks and bare doctests of ``text``, as Markdown.

    >>> print(to_markdown("See :func:`tiny_model` and :class:`~torch.device`."))
    See `tiny_model` and `device`.
    >>> to_markdown(">>> 1 + 1  # doctest: +ELLIPSIS\n2").splitlines()
    ['```pycon', '>>> 1 + 1', '2', '```']
    >>> to_markdown("Like this::\n\n    x = 1\n\nDone.").splitlines()
    ['Like this:', '', '```python', 'x = 1', '```', '', 'Done.']
    """
    lines = _ROLE.sub(_role, text).splitlines()
    return "\n".join(_fence_doctests(_fence_literal_blocks(lines)))


def _comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), without the markers."""
    found: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.insert(0, lines[index].lstrip()[2:].removeprefix(" "))
        index -= 1
    return "\n".join(found)


class DocstringsAsMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`to_markdown` before it is parsed.

    Attributes documented Sphinx-style, by ``#:`` comments above them (the type aliases of
    ``omnifix._types``, say), get those comments as their docstring.
    """

    def on_instance(self, *, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:  # noqa: ARG002
        """Griffe calls this for every object it creates (kwargs: forward compatibility)."""
        if obj.docstring is None and obj.is_attribute and obj.lineno:
            comment = _comment_above(obj.module.lines, obj.lineno)
            if comment:
                obj.docstring = griffe.Docstring(
                    comment,
                    parent=obj,
                    parser=getattr(agent, "docstring_parser", None),
                    parser_options=getattr(agent, "docstring_options", None),
                )
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
