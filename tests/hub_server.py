"""A fake Hugging Face Hub for the tests: a `ThreadingHTTPServer` on 127.0.0.1 that stores repos in memory.

It speaks just the routes huggingface_hub 2.4 uses to create a repo, commit files (preupload answers "regular"
upload mode, so no LFS / xet transfer is needed; the commit is the NDJSON payload), read repo info and file
listings, and download files (HEAD/GET `resolve` with ETag, X-Repo-Commit and Content-Length).

Authentication: a request's `Authorization: Bearer <token>` is checked against `write_tokens` and `read_tokens`.
Writes need a write token (401 for an unknown or missing token, 403 for a read-only one). Reads of a public repo
need no token, but an unknown token is refused with 401, like the Hub.

Fault injection: `fail_next(status, n)` answers the next `n` requests with `status` (e.g. 503), whatever they are;
`fail_next(status, n, path=regex)` only those whose path matches.
Every request is recorded in `requests` as `(method, path, status)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict  # path -> bytes added or replaced by this commit
    deleted: list


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    files: dict = field(default_factory=dict)  # path -> bytes at the head of main
    commits: list = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class FakeHub:
    """State of the fake Hub, shared by the handler threads. Start with `start()`, stop with `stop()`."""

    def __init__(self, write_tokens=("hf_write",), read_tokens=("hf_read",)):
        self.write_tokens = set(write_tokens)
        self.read_tokens = set(read_tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._faults: list[int] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------------------------
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, status: int, n: int = 1, path: str | None = None) -> None:
        """Answer the next `n` requests (those whose path matches the regex `path`, if given) with HTTP `status`."""
        with self.lock:
            self._faults.extend([(status, path)] * n)

    def count(self, method: str, pattern: str) -> int:
        """Number of recorded requests with this method whose path matches the regex `pattern`."""
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    def _take_fault(self, path: str) -> int | None:
        with self.lock:
            for i, (status, pattern) in enumerate(self._faults):
                if pattern is None or re.search(pattern, path):
                    del self._faults[i]
                    return status
            return None


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub  # set by FakeHub.start
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------------------
    def _reply(self, status: int, body=b"", headers=None, head_only: bool = False) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        with self.state.lock:  # recorded before the client can see the answer
            self.state.requests.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, head_only: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, {"error": message}, headers, head_only=head_only)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _auth(self, write: bool, head_only: bool = False) -> bool:
        """False (and the error sent) when the request may not proceed."""
        token = self._token()
        known = token in self.state.write_tokens or token in self.state.read_tokens
        if (token is not None and not known) or (write and token is None):
            self._error(401, "Invalid credentials in Authorization header", head_only=head_only)
            return False
        if write and token not in self.state.write_tokens:
            self._error(403, "You don't have the rights to write to this repo (read-only token)", head_only=head_only)
            return False
        return True

    def _dispatch(self, routes, head_only: bool = False) -> None:
        self.close_connection = True
        body = self._body() if self.command in ("POST", "PUT") else b""
        if urlsplit(self.path).path == "/api/agent-harnesses":  # huggingface_hub's telemetry: never faulted
            self._reply(200, {"standardEnvVars": [], "harnesses": {}}, head_only=head_only)
            return
        fault = self.state._take_fault(urlsplit(self.path).path)
        if fault is not None:
            self._error(fault, f"Injected fault {fault}", head_only=head_only)
            return
        path = unquote(urlsplit(self.path).path)
        for pattern, handler, write in routes:
            match = re.fullmatch(pattern, path)
            if match:
                if self._auth(write, head_only=head_only):
                    handler(self, body, head_only=head_only, **match.groupdict())
                return
        self._error(404, f"No fake-Hub route for {self.command} {path}", head_only=head_only)

    def do_GET(self):
        self._dispatch(GET_ROUTES)

    def do_HEAD(self):
        self._dispatch(GET_ROUTES, head_only=True)

    def do_POST(self):
        self._dispatch(POST_ROUTES)

    # -- routes --------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, head_only: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._token() is None):
            self._error(404, "Repository not found", "RepoNotFound", head_only=head_only)
            return None
        return repo

    def create_repo(self, body, head_only=False):
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.state.url}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                self._reply(
                    409,
                    {"error": "You already created this model repo", "url": url},
                    {"X-Error-Message": "You already created this model repo"},
                )
                return
            self.state.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, body, head_only=False):
        self._reply(200, {"errors": [], "warnings": []})

    def repo_info(self, body, repo_id, revision=None, head_only=False):
        repo = self._repo(repo_id, head_only)
        if repo is not None:
            siblings = [
                {"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in sorted(repo.files.items())
            ]
            self._reply(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": repo.private,
                    "siblings": siblings,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
                head_only=head_only,
            )

    def tree(self, body, repo_id, revision, path_in_repo=None, head_only=False):
        repo = self._repo(repo_id, head_only)
        if repo is not None:
            entries = [
                {"type": "file", "oid": git_blob_sha1(d), "size": len(d), "path": p}
                for p, d in sorted(repo.files.items())
            ]
            self._reply(200, entries, head_only=head_only)

    def resolve(self, body, repo_id, revision, filename, head_only=False):
        repo = self._repo(repo_id, head_only)
        if repo is None:
            return
        if filename not in repo.files:
            self._error(404, "Entry not found", "EntryNotFound", head_only=head_only)
            return
        data = repo.files[filename]
        headers = {
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": repo.sha,
            "Content-Type": "application/octet-stream",
        }
        self._reply(200, data, headers, head_only=head_only)

    def paths_info(self, body, repo_id, revision, head_only=False):
        repo = self._repo(repo_id)
        if repo is not None:
            try:
                paths = json.loads(body).get("paths", [])
            except ValueError:  # form-encoded
                paths = [unquote(v) for k, v in (kv.split("=", 1) for kv in body.decode().split("&")) if k == "paths"]
            self._reply(
                200,
                [
                    {"type": "file", "oid": git_blob_sha1(repo.files[p]), "size": len(repo.files[p]), "path": p}
                    for p in paths
                    if p in repo.files
                ],
            )

    def preupload(self, body, repo_id, revision, head_only=False):
        repo = self._repo(repo_id)
        if repo is not None:
            files = json.loads(body)["files"]
            self._reply(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_sha1(repo.files[f["path"]]) if f["path"] in repo.files else None,
                        }
                        for f in files
                    ]
                },
            )

    def commit(self, body, repo_id, revision, head_only=False):
        repo = self._repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added, deleted = {}, []
        for item in lines:
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            elif item["key"] != "header":
                self._error(400, f"The fake Hub does not support commit operation {item['key']!r}")
                return
        with self.state.lock:
            oid = hashlib.sha1(f"{repo.sha}{len(repo.commits)}{sorted(added)}".encode()).hexdigest()
            repo.commits.append(Commit(oid, header["summary"], added, deleted))
            repo.files.update(added)
            for path in deleted:
                repo.files.pop(path, None)
        self._reply(
            200, {"commitUrl": f"{self.state.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )


_ID = r"(?P<repo_id>[^/]+/[^/]+|[^/]+)"
GET_ROUTES = [
    (rf"/api/models/{_ID}/revision/(?P<revision>[^/]+)", _Handler.repo_info, False),
    (rf"/api/models/{_ID}/tree/(?P<revision>[^/]+)(?:/(?P<path_in_repo>.*))?", _Handler.tree, False),
    (rf"/api/models/{_ID}", _Handler.repo_info, False),
    (rf"/{_ID}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _Handler.resolve, False),
]
POST_ROUTES = [
    (r"/api/repos/create", _Handler.create_repo, True),
    (r"/api/validate-yaml", _Handler.validate_yaml, False),
    (rf"/api/models/{_ID}/preupload/(?P<revision>[^/]+)", _Handler.preupload, True),
    (rf"/api/models/{_ID}/commit/(?P<revision>[^/]+)", _Handler.commit, True),
    (rf"/api/models/{_ID}/paths-info/(?P<revision>[^/]+)", _Handler.paths_info, False),
]
