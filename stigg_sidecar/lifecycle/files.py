"""Reading a file a setting names, with one wording for why it could not be read.

The settings' secret files, the TLS pair and the caller tokens all say the same five things the
same way; each caller puts its own setting's name and error type in front. Never any of the file's
content in a message.
"""

from __future__ import annotations


class UnreadableFile(Exception):
    """`str()` says why, naming the path: "<path> does not exist", "... is not readable ..."."""


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UnreadableFile(f"{path} does not exist") from None
    except PermissionError:
        raise UnreadableFile(f"{path} is not readable by this process") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{path} is a directory, not a file") from None
    except OSError as e:
        raise UnreadableFile(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


def read_text(path: str) -> str:
    """The file as UTF-8 text."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(f"{path} is not UTF-8 text") from None
