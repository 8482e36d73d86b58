"""Griffe extension for the API site: docstring doctests become code blocks.

Keras-style docstrings put their ``>>>`` examples at the docstring's own
indentation, after an "Example:" line. Markdown would show them as nested
quotes; this wraps each doctest (up to the next blank line, as doctest reads
it) in a ``pycon`` fence. Doctests inside an indented section are left to
griffe. Only the rendered site changes; ``help()`` and doctests read the
docstrings as written.
"""

import griffe

_PROMPT = ">>>"


def fence_doctests(text: str) -> str:
    """Returns `text` with every top-level doctest block in a ``pycon`` fence."""
    lines, in_block = [], False
    for line in text.splitlines():
        if not in_block and line.startswith(_PROMPT):
            lines.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            lines.append("```")
            in_block = False
        lines.append(line)
    if in_block:
        lines.append("```")
    return "\n".join(lines)


class DoctestBlocks(griffe.Extension):
    """Fences the doctests of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
