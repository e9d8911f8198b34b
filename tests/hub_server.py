"""A fake Hugging Face Hub for tests: the part of the HTTP API that huggingface_hub's
`create_repo`, `create_branch`, `upload_folder` (without Xet: HF_HUB_DISABLE_XET=1) and
`upload_large_folder` use, on 127.0.0.1 with the standard library only.

Endpoints (huggingface_hub 1.x and 2.x send the same requests here):
  POST /api/repos/create                              {name, organization, visibility|private}
  POST /api/models/{repo}/branch/{branch}             create a branch from main
  POST /api/validate-yaml                             README.md front matter check (always ok)
  POST /api/models/{repo}/preupload/{rev}             upload mode per file: lfs | regular
  POST /{repo}.git/info/lfs/objects/batch             LFS batch: basic transfer, upload + verify
  PUT  /lfs-objects/{oid}                             LFS object bytes (sha256 must equal oid)
  POST /lfs-verify/{oid}                              LFS verify
  POST /api/models/{repo}/commit/{rev}                ndjson commit (header, file, lfsFile)
  GET  /api/models/{repo}[/revision/{rev}]            repo info (sha, siblings)
  GET  /api/models/{repo}/commits/{rev}               commit list
Anything else answers 404 and is recorded in `unhandled`, so a test sees what it missed, except
`IGNORED` paths, which have nothing to do with uploading (huggingface_hub 2.x fetches an
agent registry for its user-agent string).
Every request is recorded in `requests` (method, path, Authorization present) -- never the token.
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

REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
IGNORED = ("/api/agent-harnesses",)


@dataclass
class Repo:
    private: bool
    branches: dict = field(default_factory=lambda: {"main": {}})  # branch -> {path: bytes}
    commits: dict = field(default_factory=lambda: {"main": []})   # branch -> [(oid, summary)]


class FakeHub:
    """State of the fake Hub plus the server thread. Use as a context manager:
    `with FakeHub(token="hf_x") as hub: ... hub.endpoint ...`."""

    def __init__(self, token: str | None = None, lfs_min_size: int = 1 << 20):
        self.token = token              # if set, write requests without it get 401
        self.lfs_min_size = lfs_min_size
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[branch])


def _make_handler(hub: FakeHub):
    routes = []

    def route(method, pattern):
        def deco(fn):
            routes.append((method, re.compile(pattern + r"$"), fn))
            return fn
        return deco

    def commit_oid(repo_id, branch, n):
        return hashlib.sha1(f"{repo_id}@{branch}#{n}".encode()).hexdigest()

    @route("POST", r"/api/repos/create")
    def create_repo(h, m, body):
        d = json.loads(body)
        repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
        with hub.lock:
            if repo_id in hub.repos:
                # The Hub's 409 still carries the url, which create_repo(exist_ok=True) reads.
                return h.reply(409, {"error": "You already created this model repo",
                                     "url": f"{hub.endpoint}/{repo_id}"})
            private = d.get("visibility") == "private" or bool(d.get("private"))
            hub.repos[repo_id] = Repo(private=private)
        h.reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    @route("POST", r"/api/models/" + REPO + r"/branch/(?P<branch>[^/]+)")
    def create_branch(h, m, body):
        repo = hub.repos.get(m["repo"])
        if repo is None:
            return h.reply(404, {"error": "Repository not found"})
        branch = unquote(m["branch"])
        with hub.lock:
            if branch in repo.branches:
                return h.reply(409, {"error": "Reference already exists"})
            repo.branches[branch] = dict(repo.branches["main"])
            repo.commits[branch] = list(repo.commits["main"])
        h.reply(200, {})

    @route("POST", r"/api/validate-yaml")
    def validate_yaml(h, m, body):
        h.reply(200, {"errors": [], "warnings": []})

    @route("POST", r"/api/models/" + REPO + r"/preupload/(?P<rev>[^/]+)")
    def preupload(h, m, body):
        repo = hub.repos.get(m["repo"])
        if repo is None:
            return h.reply(404, {"error": "Repository not found"})
        rev = unquote(m["rev"])
        if rev not in repo.branches:
            return h.reply(404, {"error": f"Invalid rev id: {rev}"})
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith((".safetensors", ".bin")) or f["size"] >= hub.lfs_min_size
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": None})
        h.reply(200, {"files": files, "commitOid": commit_oid(m["repo"], rev, 0)})

    @route("POST", r"/" + REPO + r"\.git/info/lfs/objects/batch")
    def lfs_batch(h, m, body):
        if m["repo"] not in hub.repos:
            return h.reply(404, {"message": "Repository not found"})
        d = json.loads(body)
        assert d["operation"] == "upload" and "basic" in d["transfers"], d
        objs = []
        for o in d["objects"]:
            if o["oid"] in hub.lfs:
                objs.append({"oid": o["oid"], "size": o["size"]})  # present: no actions
                continue
            objs.append({"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{hub.endpoint}/lfs-objects/{o['oid']}", "expires_in": 3600},
                "verify": {"href": f"{hub.endpoint}/lfs-verify/{o['oid']}", "expires_in": 3600},
            }})
        h.reply(200, {"transfer": "basic", "objects": objs, "hash_algo": "sha256"})

    @route("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})")
    def lfs_put(h, m, body):
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            return h.reply(400, {"message": "sha256 mismatch"})
        with hub.lock:
            hub.lfs[m["oid"]] = body
        h.reply(200, {})

    @route("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})")
    def lfs_verify(h, m, body):
        d = json.loads(body)
        ok = d["oid"] == m["oid"] and len(hub.lfs.get(d["oid"], b"")) == d["size"]
        h.reply(200 if ok else 404, {} if ok else {"message": "object not uploaded"})

    @route("POST", r"/api/models/" + REPO + r"/commit/(?P<rev>[^/]+)")
    def commit(h, m, body):
        repo = hub.repos.get(m["repo"])
        if repo is None:
            return h.reply(404, {"error": "Repository not found"})
        rev = unquote(m["rev"])
        if rev not in repo.branches:
            return h.reply(404, {"error": f"Invalid rev id: {rev}"})
        assert h.headers.get("Content-Type", "").startswith("application/x-ndjson")
        summary, staged = None, {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "header":
                summary = v["summary"]
            elif key == "file":
                assert v["encoding"] == "base64"
                staged[v["path"]] = base64.b64decode(v["content"])
            elif key == "lfsFile":
                data = hub.lfs.get(v["oid"])
                if data is None or ("size" in v and len(data) != v["size"]):
                    return h.reply(400, {"error": f"LFS object {v['oid']} not uploaded"})
                staged[v["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                staged[v["path"]] = None
            else:
                return h.reply(400, {"error": f"unknown commit key {key}"})
        with hub.lock:
            files = repo.branches[rev]
            for p, data in staged.items():
                if data is None:
                    files.pop(p, None)
                else:
                    files[p] = data
            oid = commit_oid(m["repo"], rev, len(repo.commits[rev]) + 1)
            repo.commits[rev].append((oid, summary))
        h.reply(200, {"success": True, "commitOid": oid,
                      "commitUrl": f"{hub.endpoint}/{m['repo']}/commit/{oid}"})

    @route("GET", r"/api/models/" + REPO + r"/commits/(?P<rev>[^/]+)")
    def list_commits(h, m, body):
        repo = hub.repos.get(m["repo"])
        if repo is None:
            return h.reply(404, {"error": "Repository not found"})
        commits = repo.commits.get(unquote(m["rev"]))
        if commits is None:
            return h.reply(404, {"error": "Invalid rev id"})
        h.reply(200, [{"id": oid, "title": s, "message": "", "authors": [],
                       "date": "2026-01-01T00:00:00.000Z"} for oid, s in reversed(commits)])

    @route("GET", r"/api/models/" + REPO + r"(?:/revision/(?P<rev>[^/]+))?")
    def repo_info(h, m, body):
        repo = hub.repos.get(m["repo"])
        rev = unquote(m["rev"] or "main")
        if repo is None or rev not in repo.branches:
            return h.reply(404, {"error": "Repository not found"})
        commits = repo.commits[rev]
        h.reply(200, {"id": m["repo"], "modelId": m["repo"], "private": repo.private,
                      "sha": commits[-1][0] if commits else commit_oid(m["repo"], rev, 0),
                      "siblings": [{"rfilename": p} for p in sorted(repo.branches[rev])]})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def reply(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def handle_any(self, method):
            body = self.read_body()
            path = urlsplit(self.path).path
            auth = self.headers.get("Authorization")
            hub.requests.append((method, path, auth is not None))
            if hub.token and method != "GET" and not path.startswith(("/lfs-objects/",)) \
                    and auth != f"Bearer {hub.token}":
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            for meth, pat, fn in routes:
                m = pat.match(path)
                if meth == method and m:
                    try:
                        return fn(self, m, body)
                    except Exception as e:  # a malformed request: tell the client, 400
                        return self.reply(400, {"error": f"{type(e).__name__}: {e}"})
            if path not in IGNORED:
                hub.unhandled.append((method, path))
            self.reply(404, {"error": f"fake hub: no route for {method} {path}"})

        def do_GET(self):
            self.handle_any("GET")

        def do_POST(self):
            self.handle_any("POST")

        def do_PUT(self):
            self.handle_any("PUT")

    return Handler


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    import time

    with FakeHub() as hub:
        print(hub.endpoint, flush=True)
        while True:
            time.sleep(3600)
