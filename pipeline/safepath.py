"""Paths built from data stay inside their folder, or are refused with a reason.

Why: a label in an edited review manifest, a class name in an annotation file, an object key or
a file name in an export is data, and data can say `../../home/x/.ssh/authorized_keys`. Every
path built from data goes through `safe_join(root, *parts)`: each part must be one plain name
(not empty, `.` or `..`; no `/` or `\\`, NUL or control characters, drive letters like `C:`),
and the joined path, with every symlink resolved, must still lie inside the resolved root.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import BrandmonError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_PART_BYTES = 255  # a file name on ext4, xfs, APFS, NTFS


class UnsafePath(BrandmonError):
    """A path built from data that would leave its folder; `str(exc)` is the reason."""


def check_part(part: object, what: str = "name") -> str:
    """`part` if it is one plain file or folder name, else UnsafePath with the reason."""
    if not isinstance(part, str):
        raise UnsafePath(f"{what} must be text, got {type(part).__name__}")
    shown = repr(part[:80])
    if part in ("", ".", ".."):
        raise UnsafePath(f"{what} {shown} is not a file or folder name")
    if _CONTROL.search(part):
        raise UnsafePath(f"{what} {shown} contains a NUL or control character")
    if "/" in part or "\\" in part:
        raise UnsafePath(f"{what} {shown} contains a path separator")
    if _DRIVE.match(part):
        raise UnsafePath(f"{what} {shown} starts with a drive letter")
    if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
        raise UnsafePath(f"{what} {part[:40]!r}... is longer than {MAX_PART_BYTES} bytes")
    return part


def inside(root: Path, path: Path) -> bool:
    """True if `path`, symlinks resolved, lies inside `root` (resolved)."""
    return path.resolve().is_relative_to(Path(root).resolve())


def safe_join(root: str | Path, *parts: str, what: str = "name") -> Path:
    """`root/part/...` with every part a plain name and the result (symlinks followed, also for
    folders that do not exist yet) inside `root`; UnsafePath otherwise. Returns the resolved path
    (the one that was checked, with no symlink left in it)."""
    base = Path(root).resolve()
    for part in parts:
        check_part(part, what)
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base):
        raise UnsafePath(f"{what} {'/'.join(parts)[:120]!r} leads outside {base} (through a symlink)")
    return target
