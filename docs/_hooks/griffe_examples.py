"""Griffe extension: read Google-style ``Example:`` sections as examples (like ``Examples:``).

The package's docstrings use ``Example:`` (Napoleon accepts both spellings); griffe only
recognises ``Examples:`` and would otherwise render the section as an admonition of Markdown
text instead of highlighted doctest code. Used by the API page (``mkdocs.yml``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
