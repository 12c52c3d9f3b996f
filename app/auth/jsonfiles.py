"""Small JSON documents on a local directory or any fsspec URL: what the key store and the usage meter persist.

Callers pass paths relative to the root, built only from names they generated or validated with a regex: nothing
here ever sees raw user input. A local write goes to a temporary file that is then renamed over the target, so a
reader in another process (another ingress replica on the same disk) never sees half a document; object stores such
as S3 replace an object in one PUT anyway. Temporary files end in `.tmp`, which `names` never returns.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from typing import Any

import fsspec.core
from fsspec.implementations.local import LocalFileSystem

SUFFIX = ".json"


class JsonFiles:
    def __init__(self, root: str) -> None:
        self._fs, path = fsspec.core.url_to_fs(root)
        self._root = path.rstrip("/")
        self._local = isinstance(self._fs, LocalFileSystem)

    def _path(self, relative: str) -> str:
        return f"{self._root}/{relative}"

    def write(self, relative: str, document: dict[str, Any]) -> None:
        """Writes `<relative>.json`, replacing any earlier version whole."""
        path = self._path(relative) + SUFFIX
        data = json.dumps(document, separators=(",", ":")).encode()
        self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not self._local:
            self._fs.pipe_file(path, data)
            return
        temporary = f"{path}.{secrets.token_hex(4)}.tmp"
        self._fs.pipe_file(temporary, data)
        self._fs.mv(temporary, path)

    def read(self, relative: str) -> dict[str, Any] | None:
        """The document `<relative>.json`, or None when there is none."""
        try:
            document = json.loads(self._fs.cat_file(self._path(relative) + SUFFIX))
        except FileNotFoundError:
            return None
        if not isinstance(document, dict):
            raise ValueError(f"{relative}{SUFFIX} is not a JSON object")
        return document

    def delete(self, relative: str) -> None:
        """Removes `<relative>.json`; a document already gone is not an error (two replicas may both clean up)."""
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(relative) + SUFFIX)

    def names(self, relative_dir: str) -> list[str]:
        """The names (without `.json`) of the documents directly in a directory, sorted; none if it does not exist."""
        try:
            paths = self._fs.ls(self._path(relative_dir), detail=False)
        except FileNotFoundError:
            return []
        names = (path.rstrip("/").rsplit("/", 1)[-1] for path in paths)
        return sorted(name.removesuffix(SUFFIX) for name in names if name.endswith(SUFFIX))
