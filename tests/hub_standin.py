"""A stand-in for the Hugging Face Hub's file endpoint, served on localhost for ``HF_ENDPOINT``.

huggingface_hub reads a file of a repository with ``HEAD`` then ``GET``
``{endpoint}/{repo_id}/resolve/{revision}/{filename}``; the ``HEAD`` answer names the commit
(``X-Repo-Commit``), the file's ``ETag`` and size. This serves the files of its repositories that
way, at ``main`` or at a commit, refuses private repositories without the right bearer token
(401) and unknown files (404, ``X-Error-Code: EntryNotFound``), answers a ``Range: bytes=A-B``
request with those bytes alone (206), never answers for the file names in ``hang``, and records
every request (and every range asked for).

``silent()`` is a server that accepts connections and never answers: a Hub that hangs.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

#: The commit every repository's ``main`` resolves to.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Hub:
    """Repositories (``{repo_id: {filename: bytes}}``), private ones' token, the requests seen."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: ``(path, range)`` of every GET, the range ``None`` for a whole file.
    gets: list[tuple[str, str | None]] = field(default_factory=list)
    #: File names never answered (a Hub that hangs on them): the request waits a minute.
    hang: set[str] = field(default_factory=set)
    endpoint: str = ""


def _slice(data: bytes, asked: str | None) -> bytes:
    """The bytes a ``Range: bytes=A-B`` header asks for (all of them without one)."""
    if asked is None or not asked.startswith("bytes="):
        return data
    first, _, last = asked.removeprefix("bytes=").partition("-")
    return data[int(first) : int(last) + 1 if last else None]


def _find(hub: Hub, path: str, authorization: str | None) -> bytes | tuple[int, str] | None:
    """The file a resolve URL names, or the error status and code; ``None`` to hang."""
    owner, _, rest = path.lstrip("/").partition("/")
    name, _, rest = rest.partition("/resolve/")
    repo_id = f"{owner}/{name}"
    revision, _, filename = rest.partition("/")
    files = hub.repos.get(repo_id)
    token = hub.tokens.get(repo_id)
    if files is None or (token and authorization != f"Bearer {token}"):
        return 401, "RepoNotFound"
    if revision not in ("main", "v1", COMMIT):
        return 404, "RevisionNotFound"
    if filename not in files:
        return 404, "EntryNotFound"
    return None if filename.rpartition("/")[2] in hub.hang else files[filename]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:  # quiet
            return

        def _answer(self, *, body: bool) -> None:
            authorization = self.headers.get("authorization")
            hub.requests.append((self.command, self.path, authorization))
            found = _find(hub, self.path, authorization)
            if isinstance(found, tuple):
                self._error(*found)
                return
            if found is None:  # a file the Hub hangs on
                threading.Event().wait(60)
                return
            data = found
            asked = self.headers.get("range") if body else None
            if body:
                hub.gets.append((self.path, asked))
            data = _slice(data, asked)
            self.send_response(206 if asked else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


def serve(hub: Hub) -> Iterator[Hub]:
    """Serve ``hub`` on a free localhost port while the generator is suspended."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def silent() -> Iterator[str]:
    """The endpoint of a server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
