"""Griffe extension for the API reference: Sphinx-style roles in docstrings become code spans.

The package's docstrings cross-reference with ``:class:`~sparsetrain.Pruner``` and the like (read
well in ``help()``); Markdown would print the role literally. ``:role:`~a.b.C``` becomes ```C```,
``:role:`a.b.C``` becomes ```a.b.C```.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class RstRoles(griffe.Extension):
    """Rewrite the roles in every loaded object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
