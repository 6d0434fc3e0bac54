# Vendored copy of minihub.py from the team's shared test tooling (written for this project, stdlib only,
# tested 2026-11-22 against huggingface_hub 0.36-2.4). Verbatim but for one addition, marked ADDED: the
# /api/validate-yaml route that create_commit calls when a commit holds a README.md.
# ruff: noqa: UP031
"""minihub: a minimal Hugging Face Hub-compatible HTTP server for tests (stdlib only).

Covers what huggingface_hub (tested: 2.4.0) needs for create_repo, upload_folder/upload_file/create_commit
(regular, non-LFS uploads: the server answers preupload with uploadMode="regular", so file bytes travel base64
inside the commit ndjson), list_repo_files/list_repo_tree, repo_info/model_info, snapshot_download and
hf_hub_download, with real commits/revisions and the Hub's X-Error-Code error headers.

Not covered: LFS/Xet uploads, PRs, private/gated repos, tags/branches other than main, paths-info, pagination.

Run:  python minihub.py --data DIR [--host 127.0.0.1] [--port 0] [--token SECRET] [--read-auth] [--log]
It prints "READY http://HOST:PORT" on stdout once listening. Or in-process: srv = start(data_dir); srv.url; srv.shutdown().
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
SHA40 = re.compile(r"^[0-9a-f]{40}$")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, msg: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(msg)
        self.status, self.msg, self.code, self.headers, self.extra = status, msg, code, headers or {}, extra


class Store:
    """Repos as JSON manifests (refs + commits -> {path: blob}) and content-addressed blobs on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _manifest(self, rtype: str, repo_id: str) -> Path:
        return self.root / "repos" / rtype / repo_id / "repo.json"

    def load(self, rtype: str, repo_id: str) -> dict:
        p = self._manifest(rtype, repo_id)
        if not p.exists():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads(p.read_text())

    def save(self, rtype: str, repo_id: str, repo: dict) -> None:
        p = self._manifest(rtype, repo_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo))
        os.replace(tmp, p)

    def put_blob(self, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        p = self.root / "blobs" / sha
        if not p.exists():
            tmp = p.with_suffix(".tmp%d" % threading.get_ident())
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return {"sha256": sha, "oid": git_oid(data), "size": len(data)}

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    @staticmethod
    def resolve(repo: dict, rev: str) -> str:
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if SHA40.match(rev) and rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def new_commit(self, repo: dict, parent: str | None, tree: dict, summary: str) -> str:
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        sha = hashlib.sha1(json.dumps([parent, tree, summary, now, time.perf_counter_ns()]).encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "tree": tree, "summary": summary, "date": now}
        return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minihub/0.1"

    # ---------- plumbing ----------
    def log_message(self, fmt, *args):
        if self.server.log:
            sys.stderr.write("minihub %s\n" % (fmt % args))

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None,
              length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _body(self) -> bytes:
        return self._raw_body

    @property
    def base_url(self) -> str:
        return "http://" + (self.headers.get("Host") or "%s:%d" % self.server.server_address[:2])

    def _check_auth(self, write: bool):
        tok = self.server.token
        if tok is None or (not write and not self.server.read_auth):
            return
        if self.headers.get("Authorization") != f"Bearer {tok}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        seg = [unquote(s) for s in url.path.split("/")[1:]]
        m = self.command
        n = int(self.headers.get("Content-Length") or 0)  # always drain the body (keep-alive), even on early errors
        self._raw_body = self.rfile.read(n) if n else b""
        try:
            if seg[:1] == ["api"]:
                return self._api(m, seg[1:], query)
            # file download: /{ns}/{name}/resolve/{rev}/{path...} or /{datasets|spaces}/{ns}/{name}/resolve/...
            rtype = "model"
            if seg and seg[0] in ("datasets", "spaces"):
                rtype, seg = TYPES[seg[0]], seg[1:]
            if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
                self._check_auth(write=False)
                return self._resolve(rtype, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
            raise HubError(404, "Not found")
        except HubError as e:
            h = dict(e.headers)
            if e.code:
                h["X-Error-Code"] = e.code
            h["X-Error-Message"] = e.msg
            self._json({"error": e.msg, **e.extra}, e.status, h)

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = _dispatch

    # ---------- /api ----------
    def _api(self, m: str, seg: list, query: dict):
        st: Store = self.server.store
        if seg == ["whoami-v2"] and m == "GET":
            self._check_auth(write=True)
            return self._json({"type": "user", "name": "testuser", "auth": {"accessToken": {"role": "write"}}})
        if seg == ["validate-yaml"] and m == "POST":  # ADDED: README.md front matter; accepted as is
            return self._json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and m == "POST":
            self._check_auth(write=True)
            p = json.loads(self._body() or b"{}")
            rtype, repo_id = p.get("type") or "model", f"{p.get('organization') or 'testuser'}/{p['name']}"
            prefix = "" if rtype == "model" else rtype + "s/"
            with st.lock:
                if st._manifest(rtype, repo_id).exists():  # the client reads "url" from the 409 body (exist_ok)
                    raise HubError(409, "You already created this repo", url=f"{self.base_url}/{prefix}{repo_id}")
                repo = {"refs": {}, "commits": {}, "private": bool(p.get("private")),
                        "created": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
                tree = {".gitattributes": st.put_blob(GITATTRIBUTES)}
                repo["refs"]["main"] = st.new_commit(repo, None, tree, "initial commit")
                st.save(rtype, repo_id, repo)
            return self._json({"url": f"{self.base_url}/{prefix}{repo_id}", "name": repo_id})
        if seg == ["repos", "delete"] and m == "DELETE":
            self._check_auth(write=True)
            p = json.loads(self._body() or b"{}")
            rtype, repo_id = p.get("type") or "model", f"{p.get('organization') or 'testuser'}/{p['name']}"
            with st.lock:
                st.load(rtype, repo_id)
                st._manifest(rtype, repo_id).unlink()
            return self._json({})
        if len(seg) >= 3 and seg[0] in TYPES:
            rtype, repo_id, rest = TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:]
            if m in ("GET", "HEAD") and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                self._check_auth(write=False)
                return self._info(rtype, repo_id, rest[1] if rest else "main")
            if m == "GET" and len(rest) >= 2 and rest[0] == "tree":
                self._check_auth(write=False)
                return self._tree(rtype, repo_id, rest[1], "/".join(rest[2:]), query)
            if m == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self._check_auth(write=True)
                return self._preupload(rtype, repo_id, rest[1])
            if m == "POST" and len(rest) == 2 and rest[0] == "commit":
                self._check_auth(write=True)
                if query.get("create_pr"):
                    raise HubError(400, "create_pr is not supported by minihub")
                return self._commit(rtype, repo_id, rest[1])
        raise HubError(404, "Not found")

    def _info(self, rtype, repo_id, rev):
        st: Store = self.server.store
        repo = st.load(rtype, repo_id)
        sha = st.resolve(repo, rev)
        c = repo["commits"][sha]
        self._json({"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": sha, "private": repo["private"], "gated": False,
                    "disabled": False, "lastModified": c["date"], "createdAt": repo["created"], "tags": [],
                    "downloads": 0, "likes": 0, "siblings": [{"rfilename": p} for p in sorted(c["tree"])]})

    def _tree(self, rtype, repo_id, rev, sub, query):
        st: Store = self.server.store
        repo = st.load(rtype, repo_id)
        tree = repo["commits"][st.resolve(repo, rev)]["tree"]
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{sub} does not exist", "EntryNotFound")
        out, dirs = [], set()
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                b = tree[path]
                out.append({"type": "file", "oid": b["oid"], "size": b["size"], "path": path})
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]
        self._json(out)

    def _preupload(self, rtype, repo_id, rev):
        st: Store = self.server.store
        payload = json.loads(self._body() or b"{}")
        repo = st.load(rtype, repo_id)
        tree = repo["commits"][st.resolve(repo, rev)]["tree"]
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                               "oid": tree.get(f["path"], {}).get("oid")} for f in payload.get("files", [])]})

    def _commit(self, rtype, repo_id, rev):
        st: Store = self.server.store
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        with st.lock:
            repo = st.load(rtype, repo_id)
            if rev not in repo["refs"]:
                raise HubError(404, f"Invalid rev id: {rev} (only existing branches can be committed to)",
                               "RevisionNotFound")
            head = repo["refs"][rev]
            tree = dict(repo["commits"][head]["tree"])
            summary = "Upload"
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "header":
                    summary = v.get("summary") or summary
                    if v.get("parentCommit") and v["parentCommit"] != head:
                        raise HubError(412, "parentCommit is not the head of the branch")
                elif key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    tree[v["path"]] = st.put_blob(data)
                elif key == "deletedFile":
                    if tree.pop(v["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(pre)]:
                        del tree[p]
                else:  # lfsFile: never requested, since preupload always answers "regular"
                    raise HubError(400, f"commit operation {key!r} is not supported by minihub")
            sha = st.new_commit(repo, head, tree, summary)
            repo["refs"][rev] = sha
            st.save(rtype, repo_id, repo)
        prefix = "" if rtype == "model" else rtype + "s/"
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.base_url}/{prefix}{repo_id}/commit/{sha}"})

    # ---------- downloads ----------
    def _resolve(self, rtype, repo_id, rev, path):
        st: Store = self.server.store
        repo = st.load(rtype, repo_id)
        sha = st.resolve(repo, rev)
        blob = repo["commits"][sha]["tree"].get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        size = blob["size"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob["oid"]}"', "Accept-Ranges": "bytes"}
        start, end = 0, size - 1
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        status = 200
        if rng and self.command == "GET":
            start, end = int(rng[1]), min(int(rng[2] or size - 1), size - 1)
            if start >= size:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        if self.command == "HEAD":
            return self._send(200, b"", "application/octet-stream", headers, length=size)
        with open(st.blob_path(blob["sha256"]), "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self._send(status, data, "application/octet-stream", headers)


class MiniHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data_dir, host="127.0.0.1", port=0, token=None, read_auth=False, log=False):
        super().__init__((host, port), Handler)
        self.store, self.token, self.read_auth, self.log = Store(data_dir), token, read_auth, log

    @property
    def url(self) -> str:
        return "http://%s:%d" % self.server_address[:2]


def start(data_dir, **kw) -> MiniHub:
    """Start in a background thread; returns the server (use .url, .shutdown())."""
    srv = MiniHub(data_dir, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default=os.environ.get("MINIHUB_TOKEN"))
    ap.add_argument("--read-auth", action="store_true", help="require the token for reads too")
    ap.add_argument("--log", action="store_true")
    a = ap.parse_args(argv)
    srv = MiniHub(a.data, a.host, a.port, a.token, a.read_auth, a.log)
    print("READY", srv.url, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
