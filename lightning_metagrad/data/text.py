"""Byte-level text domains that every CPython install holds: no download.

Three domains, in this order (a continual fine-tuning stream, one domain after another):

* ``"python"``: the standard library's top-level modules, ``<stdlib>/*.py``
  (``sysconfig.get_paths()["stdlib"]``; packages such as ``json/`` are left out). One piece
  per file, keyed by its file name.
* ``"prose"``: the English help texts of ``pydoc_data.topics.topics`` (what ``help("if")``
  prints). One piece per topic, keyed by the topic name.
* ``"licenses"``: ``<stdlib>/LICENSE.txt``, the license text CPython installs next to its
  standard library (what the ``license()`` builtin prints: the PSF license, its history and
  the licenses of the software CPython incorporates). One piece per paragraph (split at blank
  lines), keyed by the paragraph's own text.

**The split is fixed and deterministic**: a piece goes to the test split when
``zlib.crc32(key) % 5 == 0`` (about a fifth of the pieces), to training otherwise; pieces are
then ordered by ``(crc32(key), key)`` (a pseudo-random order that does not depend on the file
system), each cut to its first ``piece_bytes`` bytes (4096: many files rather than a few long
ones), and joined with a blank line; a split longer than its cap (``max_train_bytes``,
``max_test_bytes``) is cut there. Pieces never straddle the split, so no test text is trained
on (except text that repeats verbatim in two pieces, e.g. a disclaimer). The contents follow
the installed Python version (its modules and help texts differ between releases); the
benchmark records the version with its results.

Example:
    >>> domain = load_domain("prose", max_train_bytes=4096, max_test_bytes=1024)
    >>> domain.name, len(domain.train), len(domain.test)
    ('prose', 4096, 1024)
    >>> is_test_piece("if") == is_test_piece("if")  # a fixed function of the key
    True
"""

from __future__ import annotations

import re
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DOMAINS",
    "ByteWindows",
    "TextDomain",
    "domain_pieces",
    "eval_loader",
    "is_test_piece",
    "load_domain",
    "load_domains",
    "train_loader",
]

#: The domains, in the benchmark's order.
DOMAINS = ("python", "prose", "licenses")
#: One piece in ``TEST_MODULUS`` goes to the test split.
TEST_MODULUS = 5
_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class TextDomain:
    """One domain's bytes: ``train`` and ``test`` (disjoint pieces), and the keys of the
    pieces each holds (file names, topic names, paragraph numbers), in their order."""

    name: str
    train: bytes
    test: bytes
    train_keys: tuple[str, ...]
    test_keys: tuple[str, ...]


def _crc(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def is_test_piece(key: str) -> bool:
    """Whether the piece keyed ``key`` belongs to the test split (``crc32(key) % 5 == 0``).

    Example:
        >>> [is_test_piece(k) for k in ("ast.py", "argparse.py")] == [
        ...     zlib.crc32(b"ast.py") % 5 == 0, zlib.crc32(b"argparse.py") % 5 == 0]
        True
    """
    return _crc(key) % TEST_MODULUS == 0


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def domain_pieces(name: str) -> dict[str, bytes]:
    """The pieces of domain ``name`` by key (see the module's docstring).

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` (naming the path and
    the way out) when this install lacks the domain's source.

    Example:
        >>> pieces = domain_pieces("python")
        >>> "ast.py" in pieces and b"import" in pieces["ast.py"]
        True
    """
    if name == "python":
        files = sorted(_stdlib().glob("*.py"))
        if not files:
            raise FileNotFoundError(
                f"domain 'python': no *.py file in the standard library folder {_stdlib()} "
                "(sysconfig.get_paths()['stdlib']); choose other `domains`"
            )
        return {f.name: f.read_bytes() for f in files}
    if name == "prose":
        try:
            from pydoc_data.topics import topics
        except ImportError as err:  # a stripped install
            raise FileNotFoundError(
                "domain 'prose' reads pydoc_data.topics, which this Python install lacks "
                f"({err}); choose other `domains`"
            ) from None
        return {key: text.encode("utf-8") for key, text in sorted(topics.items())}
    if name == "licenses":
        path = _stdlib() / "LICENSE.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"domain 'licenses' reads {path}, the license text CPython installs with its "
                "standard library, and this install lacks it; choose other `domains`"
            )
        text = path.read_bytes().replace(b"\r\n", b"\n")
        paragraphs = [p.strip(b"\n") for p in re.split(rb"\n[ \t]*\n", text)]
        return {p.decode("utf-8", "replace"): p for p in paragraphs if p.strip()}
    raise ValueError(f"`domain` must be one of {DOMAINS}, got {name!r}")


def _join(
    pieces: dict[str, bytes], keys: list[str], cap: int, piece_bytes: int
) -> tuple[bytes, tuple[str, ...]]:
    out, used, size = [], [], 0
    for key in keys:
        if size >= cap:
            break
        out.append(pieces[key][:piece_bytes])
        used.append(key)
        size += len(out[-1]) + len(_SEPARATOR)
    return _SEPARATOR.join(out)[:cap], tuple(used)


def load_domain(
    name: str,
    *,
    max_train_bytes: int = 1 << 19,
    max_test_bytes: int = 1 << 15,
    piece_bytes: int = 4096,
) -> TextDomain:
    """Domain ``name`` split into training and test bytes (each cut at its cap).

    Example:
        >>> d = load_domain("licenses")
        >>> set(d.train_keys).isdisjoint(d.test_keys) and len(d.test) > 0
        True
    """
    for arg, value in (
        ("max_train_bytes", max_train_bytes),
        ("max_test_bytes", max_test_bytes),
        ("piece_bytes", piece_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive int, got {value!r}")
    pieces = domain_pieces(name)
    keys = sorted(pieces, key=lambda k: (_crc(k), k))
    train_pieces = [k for k in keys if not is_test_piece(k)]
    test_pieces = [k for k in keys if is_test_piece(k)]
    train, train_keys = _join(pieces, train_pieces, max_train_bytes, piece_bytes)
    test, test_keys = _join(pieces, test_pieces, max_test_bytes, piece_bytes)
    if not train_keys or not test_keys:
        raise ValueError(f"domain {name!r} has too few pieces for a train/test split")
    return TextDomain(name, train, test, train_keys, test_keys)


def load_domains(names: Sequence[str] = DOMAINS, **kwargs: int) -> list[TextDomain]:
    """:func:`load_domain` for each name, in order (``kwargs``: its size caps)."""
    if isinstance(names, str) or not names:
        raise ValueError(f"`domains` must be a non-empty sequence of {DOMAINS}, got {names!r}")
    return [load_domain(n, **kwargs) for n in names]


class ByteWindows(Dataset):
    """Windows of ``context + 1`` bytes of ``data`` at ``offsets``, as next-byte pairs:
    ``{"x": window[:-1], "y": window[1:]}`` (int64 tensors of length ``context``).

    Example:
        >>> item = ByteWindows(b"abcdef", context=3, offsets=[1])[0]
        >>> bytes(item["x"].tolist()), bytes(item["y"].tolist())
        (b'bcd', b'cde')
    """

    def __init__(self, data: bytes, context: int, offsets: Sequence[int] | torch.Tensor) -> None:
        if len(data) < context + 1:
            raise ValueError(
                f"`data` holds {len(data)} bytes, fewer than `context` + 1 = {context + 1}"
            )
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.context = context
        self.offsets = torch.as_tensor(offsets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        window = self.data[start : start + self.context + 1].long()
        return {"x": window[:-1], "y": window[1:]}


def train_loader(
    domain: TextDomain, *, context: int, batch_size: int, steps: int, seed: int
) -> DataLoader:
    """``steps`` batches of random training windows (offsets drawn with ``seed``): one pass
    is one task of ``steps`` optimizer steps."""
    generator = torch.Generator().manual_seed(seed)
    high = len(domain.train) - context
    if high < 1:
        raise ValueError(
            f"domain {domain.name!r}: {len(domain.train)} training bytes, too few for `context` "
            f"{context}"
        )
    offsets = torch.randint(0, high, (steps * batch_size,), generator=generator)
    return DataLoader(ByteWindows(domain.train, context, offsets), batch_size=batch_size)


def eval_loader(
    domain: TextDomain, *, context: int, batch_size: int = 256, max_windows: int | None = None
) -> DataLoader:
    """The test bytes cut into consecutive, non-overlapping windows (the first
    ``max_windows``), in order: the same for every seed and method."""
    offsets = list(range(0, len(domain.test) - context, context))
    if max_windows is not None:
        offsets = offsets[:max_windows]
    if not offsets:
        raise ValueError(
            f"domain {domain.name!r}: {len(domain.test)} test bytes, too few for `context` "
            f"{context}"
        )
    return DataLoader(ByteWindows(domain.test, context, offsets), batch_size=batch_size)
