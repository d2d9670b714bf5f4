"""A local stand-in for the Hugging Face Hub endpoints that publishing and downloading use.

Speaks the wire protocol huggingface_hub 2.4 uses without hf_xet (HF_HUB_DISABLE_XET=1):
  POST /api/repos/create                             create_repo (409 when it exists)
  POST /api/validate-yaml                            README front matter check before a commit
  POST /api/{type}s/{repo}/preupload/{rev}           which files go inline and which through LFS
  POST /{prefix}{repo}.git/info/lfs/objects/batch    LFS upload instructions (basic transfer)
  PUT  /_lfs/{oid}  POST /_lfs_verify                 the LFS upload itself and its verification
  POST /api/{type}s/{repo}/commit/{rev}              NDJSON commit: inline base64 files + LFS pointers
  POST /api/{type}s/{repo}/branch/{branch}           create_branch
  POST /api/spaces/{repo}/variables|hardware         add_space_variable, request_space_hardware
  GET  /api/{type}s/{repo}[/revision/{rev}]          repo_info (snapshot_download)
  GET  /api/{type}s/{repo}/tree/{rev}                list_repo_tree
  HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}      hf_hub_download
Every API call needs `Authorization: Bearer <one of tokens>`; others get the Hub's 401.
`requests` records (method, path, headers, body) of each call for the tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+?)"
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INVALID = "Invalid credentials in Authorization header"


class FakeHub:
    def __init__(self, tokens=("hf_" + "T0k3n" * 7,)):
        self.tokens = set(tokens)
        self.repos: dict[str, dict] = {}  # repo_id -> {type, private, sdk, hardware, variables, branches, commits}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]["files"]

    # ------------------------------------------------------------ routes
    def route(self, h: "_Handler", method: str, path: str, body: bytes):
        with self.lock:
            headers = {k.lower(): v for k, v in h.headers.items()}
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        if method == "PUT" and (m := re.fullmatch(r"/_lfs/(?P<oid>[0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[m["oid"]] = body
            return 200, {}
        if method in ("GET", "HEAD") and (m := re.fullmatch(r"/(?:(?P<t>spaces|datasets)/)?" + REPO
                                                            + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)):
            return self.resolve(h, m, method)
        public_read = method == "GET" and (m := re.fullmatch(r"/api/\w+s/" + REPO + r"(?:/.*)?", path)) \
            and m["repo"] in self.repos and not self.repos[m["repo"]]["private"]
        if not public_read and not self.authorized(h):
            return 401, {"error": INVALID}, {"X-Error-Message": INVALID}
        kind = h.headers.get("Content-Type", "")
        data = json.loads(body) if body and "json" in kind and "ndjson" not in kind else None
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(data)
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(data)
        if method == "POST" and path == "/_lfs_verify":
            ok = self.lfs.get(data["oid"]) is not None and len(self.lfs[data["oid"]]) == data["size"]
            return (200, {}) if ok else (404, {"error": "object not found"})
        if m := re.fullmatch(r"/(?:(?P<t>spaces|datasets)/)?" + REPO + r"\.git/info/lfs/objects/batch", path):
            return self.lfs_batch(data)
        m = re.fullmatch(r"/api/(?P<t>model|space|dataset)s/" + REPO + r"(?P<rest>/.*)?", path)
        if not m or m["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        repo, rest = self.repos[m["repo"]], m["rest"] or ""
        if method == "GET" and (rest == "" or rest.startswith("/revision/")):
            return self.repo_info(m["repo"], unquote(rest[len("/revision/"):]) or "main")
        if method == "GET" and (t := re.fullmatch(r"/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", rest)):
            return self.tree(repo, unquote(t["rev"]))
        if method == "POST" and re.fullmatch(r"/preupload/[^/]+", rest):
            return self.preupload(data)
        if method == "POST" and (c := re.fullmatch(r"/commit/(?P<rev>[^/]+)", rest)):
            return self.commit(m["repo"], unquote(c["rev"]), body)
        if method == "POST" and (b := re.fullmatch(r"/branch/(?P<branch>[^/]+)", rest)):
            return self.create_branch(repo, unquote(b["branch"]), (data or {}).get("startingPoint") or "main")
        if method == "POST" and rest == "/variables" and repo["type"] == "space":
            repo["variables"][data["key"]] = {"value": data["value"], "description": data.get("description"),
                                              "updatedAt": "2026-01-01T00:00:00.000Z"}
            return 200, repo["variables"]
        if method == "POST" and rest == "/hardware" and repo["type"] == "space":
            repo["hardware"] = data["flavor"]
            return 200, {"stage": "BUILDING", "hardware": {"current": None, "requested": data["flavor"]}}
        return 404, {"error": f"fake hub: no route for {method} {path}"}

    def authorized(self, h) -> bool:
        auth = h.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.tokens

    def create_repo(self, data):
        repo_id = f"{data['organization']}/{data['name']}"
        kind = data.get("type") or "model"
        if repo_id in self.repos:
            return 409, {"error": f"You already created this {kind} repo", "url": self.repo_url(repo_id, kind)}
        if kind == "space" and data.get("sdk") not in ("gradio", "streamlit", "docker", "static"):
            return 400, {"error": "sdk required for a Space"}
        self.repos[repo_id] = {"type": kind, "private": data.get("visibility") == "private", "sdk": data.get("sdk"),
                               "hardware": data.get("hardware"), "variables": {}, "commits": [],
                               "branches": {"main": {"sha": "0" * 40, "files": {}}}}
        return 200, {"url": self.repo_url(repo_id, kind)}

    def repo_url(self, repo_id, kind):
        return f"{self.url}/{PREFIX[kind]}{repo_id}"

    def validate_yaml(self, data):
        text = data["content"]
        match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
        try:
            meta = yaml.safe_load(match[1]) if match else None
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if meta is not None and not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}
        return 200, {"errors": [], "warnings": [] if meta else [{"message": "empty or missing yaml metadata"}]}

    def preupload(self, data):
        files = []
        for f in data["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith((".safetensors", ".png", ".bin")) or b"\0" in sample or f["size"] > 10 * 2**20
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}

    def lfs_batch(self, data):
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # already stored: no actions, the client skips it
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/_lfs_verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def commit(self, repo_id, revision, body):
        repo = self.repos[repo_id]
        if revision not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        branch = repo["branches"][revision]
        new = dict(branch["files"])
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                new[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                new[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                new.pop(value["path"], None)
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in new.items())).encode()
                           + branch["sha"].encode()).hexdigest()
        branch.update(files=new, sha=sha)
        repo["commits"].append({"branch": revision, "summary": header["summary"], "sha": sha})
        return 200, {"commitUrl": f"{self.repo_url(repo_id, repo['type'])}/commit/{sha}", "commitOid": sha,
                     "pullRequestUrl": None}

    def create_branch(self, repo, name, start):
        if name in repo["branches"]:
            return 409, {"error": "Reference already exists"}
        source = self.branch(repo, start)
        repo["branches"][name] = {"sha": source["sha"], "files": dict(source["files"])}
        return 200, {}

    def branch(self, repo, rev):
        """A branch by name, or the branch whose head is commit `rev`."""
        if rev in repo["branches"]:
            return repo["branches"][rev]
        return next((b for b in repo["branches"].values() if b["sha"] == rev), None)

    def repo_info(self, repo_id, rev):
        repo = self.repos[repo_id]
        branch = self.branch(repo, rev)
        if branch is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        return 200, {"id": repo_id, "sha": branch["sha"], "private": repo["private"],
                     "siblings": [{"rfilename": p} for p in sorted(branch["files"])]}

    def tree(self, repo, rev):
        branch = self.branch(repo, rev)
        if branch is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        return 200, [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                     for p, d in sorted(branch["files"].items())]

    def resolve(self, h, m, method):
        repo = self.repos.get(m["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if repo["private"] and not self.authorized(h):
            return 401, {"error": INVALID}, {"X-Error-Message": INVALID}
        branch = self.branch(repo, unquote(m["rev"]))
        data = branch and branch["files"].get(unquote(m["file"]))
        if data is None:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        headers = {"X-Repo-Commit": branch["sha"], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return 200, data, headers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method):
        body = self._body() if method in ("POST", "PUT") else b""
        result = self.server.hub.route(self, method, urlsplit(self.path).path, body)
        status, payload, extra = (*result, {})[:3]
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(raw)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")
