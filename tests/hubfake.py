"""Offline stand-ins for the Hugging Face Hub used by the hub tests.

* :func:`populate_hub_cache` lays a local folder out exactly as ``huggingface_hub`` stores a download
  (``models--org--name/{blobs,snapshots/<commit>,refs/main}``), so ``HF_HUB_OFFLINE=1`` lookups by repo id
  find it.
* :class:`FakeHub` is a small HTTP server on 127.0.0.1 that answers the endpoints ``create_repo`` and
  ``upload_folder`` call (repo create, README YAML validation, preupload, ndjson commit, and the LFS batch +
  PUT path used when hf_xet is disabled). It serves on a daemon thread and shuts itself down after
  ``lifetime`` seconds even if a test forgets to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def populate_hub_cache(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, *,
                       revision: str = "main", commit: str | None = None) -> Path:
    """Copy ``folder`` into the HF cache layout as ``repo_id`` at ``revision``; return the snapshot folder.

    Files are stored once in ``blobs/`` (named by their sha256, like LFS files) and linked from
    ``snapshots/<commit>/`` with relative symlinks, as huggingface_hub does (copies where symlinks fail).
    """
    src = Path(folder)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for f in files:
            h.update(f.relative_to(src).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        commit = h.hexdigest()  # 40 hex digits, like a git commit id
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs = storage / "blobs"
    snap = storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        rel = f.relative_to(src)
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:
            shutil.copyfile(blob, target)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)  # no newline: huggingface_hub reads it verbatim
    return snap


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reply(self, status: int, obj: Any = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        self.server.hub.auth_headers.append(auth)
        if not auth.startswith("Bearer "):
            self._reply(401, {"error": "Invalid credentials in Authorization header"},
                        {"X-Error-Code": "RepoNotFound"})
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        hub = self.server.hub
        path = self.path.split("?", 1)[0]
        body = self._body()
        hub.requests.append(("POST", path))
        if not self._authorized():
            return
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in hub.repos:
                self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                return
            hub.repos[repo_id] = {"files": {}, "visibility": payload.get("visibility"), "commits": []}
            self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            return
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            errors = hub.validate_card(content)
            self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
            return
        parts = path.strip("/").split("/")
        # /api/models/{org}/{name}/preupload/{rev} and /api/models/{org}/{name}/commit/{rev}
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo_id = f"{parts[2]}/{parts[3]}"
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                self._reply(200, {"files": [
                    {"path": f["path"], "uploadMode": hub.upload_mode(f["path"]), "shouldIgnore": False, "oid": None}
                    for f in files]})
                return
            repo["commits"].append(self._commit(repo, body))
            self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{len(repo['commits']):040x}",
                              "commitOid": f"{len(repo['commits']):040x}"})
            return
        # LFS batch: /{org}/{name}.git/info/lfs/objects/batch
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            payload = json.loads(body)
            objects = []
            for obj in payload["objects"]:
                actions = None if obj["oid"] in hub.lfs else {
                    "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append({"oid": obj["oid"], "size": obj["size"],
                                **({"actions": actions} if actions else {})})
            self._reply(200, {"transfer": "basic", "objects": objects})
            return
        self._reply(404, {"error": f"fake hub: no POST route for {path}"})

    def _commit(self, repo: dict, body: bytes) -> dict:
        hub = self.server.hub
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                repo["files"][v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                data = hub.lfs[v["oid"]]
                assert hashlib.sha256(data).hexdigest() == v["oid"]
                repo["files"][v["path"]] = data
            elif item["key"] == "deletedFile":
                repo["files"].pop(v["path"], None)
        return header

    def do_PUT(self) -> None:  # noqa: N802
        hub = self.server.hub
        path = self.path.split("?", 1)[0]
        hub.requests.append(("PUT", path))
        if path.startswith("/lfs-upload/"):
            oid = path.rsplit("/", 1)[1]
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                self._reply(400, {"error": "sha256 mismatch"})
                return
            hub.lfs[oid] = data
            self._reply(200, {})
            return
        self._reply(404, {"error": f"fake hub: no PUT route for {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self.server.hub.requests.append(("GET", self.path))
        self._reply(404, {"error": f"fake hub: no GET route for {self.path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "FakeHub"


class FakeHub:
    """In-memory Hub on 127.0.0.1: ``repos[repo_id]["files"][path] -> bytes`` after an upload.

    ``lfs_suffixes``: files with these suffixes are answered ``uploadMode: lfs`` at preupload (the real Hub
    does this for weights); everything else is ``regular`` (inlined base64 in the ndjson commit).
    """

    def __init__(self, *, lifetime: float = 60.0, lfs_suffixes: tuple[str, ...] = ()):
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.lfs_suffixes = lfs_suffixes
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def upload_mode(self, path: str) -> str:
        return "lfs" if path.endswith(self.lfs_suffixes) else "regular"

    @staticmethod
    def validate_card(content: str) -> list[str]:
        """Reject README.md whose YAML front matter does not parse to a mapping (as the Hub does)."""
        if not content.startswith("---\n"):
            return []
        end = content.find("\n---", 4)
        if end < 0:
            return ["unterminated YAML front matter"]
        import yaml

        try:
            meta = yaml.safe_load(content[4:end])
        except yaml.YAMLError as exc:
            return [f"invalid YAML: {exc}"]
        return [] if isinstance(meta, dict) else ["front matter is not a mapping"]

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
