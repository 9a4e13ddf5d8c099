"""A stand-in Hugging Face Hub on 127.0.0.1 for the push tests (the real one is unreachable).

It speaks the endpoints huggingface_hub 2.4 uses to create a repo and commit a folder:

    POST /api/repos/create                          create_repo (409 when it exists)
    GET  /api/models/{ns}/{name}                    repo_info (create_repo's exist_ok fallback)
    POST /api/models/{ns}/{name}/branch/{branch}    create_branch
    POST /api/validate-yaml                         README.md metadata check before hashing
    POST /api/models/{ns}/{name}/preupload/{rev}    upload modes: "regular" for every file, so
                                                    contents travel base64 in the commit (no LFS)
    POST /api/models/{ns}/{name}/commit/{rev}       NDJSON: header line, then one line per file
    GET  /api/whoami-v2

and, read-only and without a token, what `datasets.load_dataset(..., streaming=True)` and
`HfApi.dataset_info` read of a public dataset repo (`DatasetRepo`):

    GET  /api/datasets/{ns}/{name}[/revision/{rev}]  dataset_info: the commit of a revision
    GET  /api/datasets/{ns}/{name}/tree/{rev}[/{path}]  the files of a folder
    POST /api/datasets/{ns}/{name}/paths-info/{rev}  what some paths are
    HEAD|GET /datasets/{ns}/{name}/resolve/{rev}/{path}  a file, with HTTP ranges

Every request is recorded (method, path, headers, body) so tests can check where the token
went; committed files are kept per repo and branch. `fail` injects an HTTP status for one
endpoint name, `drop` closes the connection without an answer, `delay` answers late.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "other"}
PIPELINES = {"text-generation", "text2text-generation", "fill-mask"}
REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
DATASET = r"/api/datasets/(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", "ds_tree", DATASET + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
    ("POST", "ds_paths", DATASET + r"/paths-info/(?P<rev>[^/]+)"),
    ("GET", "ds_info", DATASET + r"(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "ds_file", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("HEAD", "ds_file", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate", r"/api/validate-yaml"),
    ("GET", "whoami", r"/api/whoami-v2"),
    ("POST", "preupload", REPO + r"/preupload/(?P<rev>[^/?]+)"),
    ("POST", "commit", REPO + r"/commit/(?P<rev>[^/?]+)"),
    ("POST", "branch", REPO + r"/branch/(?P<rev>[^/?]+)"),
    ("GET", "info", REPO),
]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class DatasetRepo:
    """A public dataset repo: commits (sha -> path -> bytes) and refs (branch or tag -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        """Commit `files` (the whole tree) on `ref`; returns the commit sha."""
        sha = hashlib.sha1(repr(sorted(files.items())).encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def at(self, rev: str | None) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(rev or "main", rev)
        return (sha, self.commits[sha]) if sha in self.commits else None


@dataclass
class RawFile:
    """A file answer (not JSON): bytes, with the headers huggingface_hub reads."""

    data: bytes
    headers: dict[str, str]


def validate_metadata(readme: str) -> list[str]:
    """The Hub's README metadata checks that matter here (errors; empty when valid)."""
    m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"YAML: {e}"]
    errors = []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    if "license" in meta and meta["license"] not in LICENSES:
        errors.append(f'"license" must be one of {sorted(LICENSES)}')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINES:
        errors.append('"pipeline_tag" is not a known task')
    for key in ("datasets", "tags", "language"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    for model in meta.get("model-index") or []:
        for result in model.get("results", []):
            if not {"task", "dataset", "metrics"} <= set(result) or "type" not in result["task"]:
                errors.append('"model-index" results need task.type, dataset and metrics')
            for metric in result.get("metrics", []):
                if "type" not in metric or not isinstance(metric.get("value"), (int, float)):
                    errors.append('"model-index" metrics need a type and a numeric value')
    return errors


class StandInHub:
    """The server: `with StandInHub(token=...) as hub: ...hub.url...`."""

    def __init__(self, token: str, user: str = "learner", repos: dict[str, Repo] | None = None) -> None:
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = repos or {}
        self.datasets: dict[str, DatasetRepo] = {}
        self.seen: list[Seen] = []
        self.commits: list[dict[str, Any]] = []
        self.fail: dict[str, int] = {}  # endpoint name -> HTTP status to answer
        self.drop: set[str] = set()  # endpoint names whose connection is closed unanswered
        self.delay: dict[str, float] = {}  # endpoint name -> seconds to wait before answering
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def names(self) -> list[str]:
        """Endpoint names of the requests seen, in order."""
        return [route(s.method, s.path)[0] for s in self.seen]

    # --------------------------------------------------------------- endpoints

    def handle(self, name: str, args: dict[str, str], headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if name in self.fail:
            return self.fail[name], {"error": f"injected {self.fail[name]}"}
        if name.startswith("ds_"):
            return self.dataset(name, args, headers, body)
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if name == "whoami":
            return 200, {"type": "user", "name": self.user, "orgs": []}
        if name == "validate":
            errors = validate_metadata(json.loads(body)["content"])
            return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}
        if name == "create":
            return self.create(json.loads(body))
        repo = self.repos.get(args["repo"])
        if repo is None or (repo.private and repo.owner != self.user):
            return 404, {"error": "Repository not found", "_code": "RepoNotFound"}
        if name == "info":
            return 200, {"id": args["repo"], "private": repo.private, "sha": "0" * 40, "siblings": []}
        if repo.owner != self.user:
            return 403, {"error": "You don't have the rights to write to this repo"}
        if name == "branch":
            if args["rev"] in repo.branches:
                return 409, {"error": "Branch already exists"}
            repo.branches[args["rev"]] = dict(repo.branches["main"])
            return 200, {}
        if args["rev"] not in repo.branches:
            return 404, {"error": f"Invalid rev id: {args['rev']}", "_code": "RevisionNotFound"}
        if name == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        return self.commit(args["repo"], args["rev"], body)

    def dataset(self, name: str, args: dict[str, str], headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        repo = self.datasets.get(args["repo"])
        if repo is None:
            return 404, {"error": "Repository not found", "_code": "RepoNotFound"}
        found = repo.at(args.get("rev"))
        if found is None:
            return 404, {"error": f"Invalid rev id: {args.get('rev')}", "_code": "RevisionNotFound"}
        sha, files = found
        if name == "ds_info":
            return 200, {"id": args["repo"], "sha": sha, "private": False, "disabled": False, "gated": False,
                         "tags": [], "cardData": {}, "siblings": [{"rfilename": f} for f in sorted(files)]}
        if name == "ds_tree":
            return 200, self.tree(files, (args.get("path") or "").strip("/"))
        if name == "ds_paths":
            fields = urllib.parse.parse_qs(body.decode())
            paths = fields.get("paths") or json.loads(body or b"{}").get("paths", [])
            return 200, [e for e in self.tree(files, "", recursive=True) if e["path"] in paths]
        data = files.get(args["path"])
        if data is None:
            return 404, {"error": "Entry not found", "_code": "EntryNotFound"}
        out = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, RawFile(data[start : end + 1], out)
        return 200, RawFile(data, out)

    @staticmethod
    def tree(files: dict[str, bytes], folder: str, recursive: bool = False) -> list[dict[str, Any]]:
        """The Hub's tree entries under `folder` (files and folders; all levels with `recursive`)."""
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(sub, {"type": "directory", "path": sub, "oid": "0" * 40, "size": 0})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()}
        return list(entries.values())

    def create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        ns = payload.get("organization") or self.user
        repo_id = f"{ns}/{payload['name']}"
        if ns != self.user:
            return 403, {"error": f'You don\'t have the rights to create a model under the namespace "{ns}"'}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(owner=ns, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": "1"}

    def commit(self, repo_id: str, rev: str, body: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files: dict[str, bytes] = {}
        for item in lines:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return 400, {"error": f"the stand-in Hub does not take {item['key']}"}
        self.repos[repo_id].branches[rev].update(files)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo_id, "revision": rev, "summary": header["summary"], "files": files})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}

    # ----------------------------------------------------------------- plumbing

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub.lock:
                    hub.seen.append(Seen(self.command, self.path, headers, body))
                name, args = route(self.command, self.path)
                time.sleep(hub.delay.get(name, 0.0))
                if name in hub.drop:
                    self.close_connection = True
                    self.connection.close()  # no answer at all: a dropped connection
                    return
                with hub.lock:
                    status, payload = hub.handle(name, args, headers, body) if name else (404, {"error": "no route"})
                if isinstance(payload, RawFile):
                    self.send_response(status)
                    for key, value in {**payload.headers, "Content-Type": "application/octet-stream",
                                       "Content-Length": str(len(payload.data))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload.data)
                    return
                code = payload.pop("_code", None) if isinstance(payload, dict) else None
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code:
                    self.send_header("X-Error-Code", code)
                if status >= 400 and isinstance(payload, dict) and "error" in payload:
                    self.send_header("X-Error-Message", payload["error"])
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _serve  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        return Handler


def route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """(endpoint name, URL arguments) of a request, or ("", {}) when unknown."""
    path = path.split("?")[0]
    for m, name, pattern in ROUTES:
        match = re.fullmatch(pattern, path)
        if m == method and match:
            return name, match.groupdict()
    return "", {}
