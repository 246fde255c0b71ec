"""MkDocs hook: links from a page to repository files outside ``docs/``.

Pages such as ``supported-setups.md`` link to the tests
(``../tests/integration/test_callback.py``): the links work when the Markdown is read on GitHub,
but those files are not part of the site, so ``mkdocs build --strict`` would reject them. In the
built site such a link becomes its text (the path stays visible in a code span), or a link to
the file on ``repo_url`` when the configuration sets one. The Markdown sources are not changed.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

_LINK = re.compile(
    r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)"
)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src_dir = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def replace(match: re.Match[str]) -> str:
        path = posixpath.normpath(posixpath.join("docs", src_dir, match["target"]))
        if path.startswith("docs/"):  # inside the site: leave it to MkDocs' own checks
            return match[0]
        text = match["text"]
        if repo_url:
            return f"[{text}]({repo_url}/blob/main/{path}{match['anchor'] or ''})"
        if text.strip("`") == path or "`" in text:
            return text
        return f"{text} (`{path}`)"

    return _LINK.sub(replace, markdown)
