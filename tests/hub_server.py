"""A Hugging Face Hub on the loopback address, for the tests that push and pull over real HTTP.

    python tests/hub_server.py --config hub.toml       # what the ``hub`` fixture in test_hub.py starts

The read side is olah (pinned in the Makefile), offline, serving the git repositories under its
``mirrors-path`` (``models/user/name``, ``datasets/user/name``) as the Hub's API and ``resolve`` routes do.
olah has no write side, so the routes below, put in front of olah's, take what huggingface_hub sends
(create_repo, the preupload check, LFS uploads, the NDJSON commit, tags) and make each commit a git commit
that olah then serves. What the real Hub does and this does not: Xet storage (clients must set
HF_HUB_DISABLE_XET=1), authentication (any token is "user"), pull requests, branches other than main,
and file storage in LFS (uploaded files become plain git blobs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from olah import server, server_api_routes

write = APIRouter()
USER = "user"


def _mirror() -> Path:
    return Path(server.app.state.app_settings.config.mirrors_path[0])


def _repo(repo_type: str, namespace: str, name: str) -> Path:
    return _mirror() / repo_type / namespace / name


def _uploads() -> Path:
    return _mirror() / ".uploads"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=hub", "-c", "user.email=hub@localhost", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@write.get("/api/whoami-v2")
async def whoami() -> dict:
    return {"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": {"type": "access_token",
            "accessToken": {"displayName": "test", "role": "write"}}}


@write.api_route("/api/{repo_type}/{namespace}/{name}", methods=["GET", "HEAD"])
async def repo_info(repo_type: str, namespace: str, name: str, request: Request) -> Response:
    """A repo's info at main: olah would ask the (unreachable) upstream which commit is the newest."""
    if not _repo(repo_type, namespace, name).is_dir():
        return JSONResponse({"error": "Repository not found"}, status_code=404, headers={"X-Error-Code": "RepoNotFound"})
    return await server_api_routes.meta_proxy_common(request.app, repo_type=repo_type, org=namespace, repo=name, commit="main",
                                                     method=request.method.lower(), authorization=None)


@write.api_route("/api/{repo_type}/{namespace}/{name}/tree/{revision}", methods=["GET", "HEAD"])
async def tree_root(repo_type: str, namespace: str, name: str, revision: str, request: Request,
                    recursive: bool = False, expand: bool = False) -> Response:
    """The top of a repo's tree: olah answers it only at ``tree/{revision}/``, with a redirect the client does not follow."""
    return await server_api_routes.tree_proxy_commit_expanded(repo_type, namespace, name, revision, "", request,
                                                              recursive=recursive, expand=expand)


@write.post("/api/validate-yaml")
async def validate_yaml() -> dict:
    return {"errors": [], "warnings": []}


@write.post("/api/repos/create")
async def create_repo(request: Request) -> Response:
    body = await request.json()
    repo_type = (body.get("type") or "model") + "s"
    namespace, name = body.get("organization") or USER, body["name"]
    if "/" in name:
        namespace, name = name.split("/", 1)
    repo = _repo(repo_type, namespace, name)
    url = f"{request.base_url}{'' if repo_type == 'models' else repo_type + '/'}{namespace}/{name}"
    if repo.exists():
        return JSONResponse({"error": "You already created this repo", "url": url}, status_code=409)
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text("*.safetensors binary\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "initial commit")
    return JSONResponse({"url": url, "name": f"{namespace}/{name}"})


@write.post("/api/{repo_type}/{namespace}/{name}/preupload/{revision}")
async def preupload(repo_type: str, namespace: str, name: str, revision: str, request: Request) -> dict:
    files = (await request.json())["files"]
    # The real Hub sends binaries and files over 10 MB through LFS: the client's upload path is the same.
    return {"files": [{"path": f["path"], "uploadMode": "lfs" if f["size"] > 10_000_000 or f["path"].endswith(
        (".safetensors", ".bin", ".parquet", ".png")) else "regular", "shouldIgnore": False} for f in files]}


@write.post("/{namespace}/{name}.git/info/lfs/objects/batch")
@write.post("/{repo_type}/{namespace}/{name}.git/info/lfs/objects/batch")
async def lfs_batch(request: Request, namespace: str, name: str, repo_type: str = "models") -> dict:
    objects = (await request.json())["objects"]
    return {"transfer": "basic", "objects": [
        {"oid": o["oid"], "size": o["size"], "authenticated": True,
         "actions": {"upload": {"href": f"{request.base_url}lfs-upload/{o['oid']}"}}}
        for o in objects if not (_uploads() / o["oid"]).is_file()] + [
        {"oid": o["oid"], "size": o["size"]} for o in objects if (_uploads() / o["oid"]).is_file()]}


@write.put("/lfs-upload/{oid}")
async def lfs_upload(oid: str, request: Request) -> Response:
    data = await request.body()
    if hashlib.sha256(data).hexdigest() != oid:
        return JSONResponse({"error": "sha256 mismatch"}, status_code=400)
    _uploads().mkdir(parents=True, exist_ok=True)
    (_uploads() / oid).write_bytes(data)
    return Response(status_code=200)


@write.post("/api/{repo_type}/{namespace}/{name}/commit/{revision}")
async def commit(repo_type: str, namespace: str, name: str, revision: str, request: Request) -> Response:
    repo = _repo(repo_type, namespace, name)
    if not repo.is_dir():
        return JSONResponse({"error": "Repository not found"}, status_code=404)
    if f"{namespace}/{name}" == os.environ.get("CATDOG_HUB_STOP_ON"):  # a server that stops in the middle of a push
        os._exit(1)
    summary = "upload"
    for line in (await request.body()).decode().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        key, value = item["key"], item["value"]
        if key == "header":
            summary = value.get("summary") or summary
            continue
        path = repo / value["path"]
        if key == "deletedFile":
            path.unlink(missing_ok=True)
        elif key == "deletedFolder":
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if key == "file":
                path.write_bytes(base64.b64decode(value["content"]))
            else:  # lfsFile: uploaded before the commit
                shutil.copyfile(_uploads() / value["oid"], path)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", summary)
    oid = _git(repo, "rev-parse", "HEAD")
    prefix = "" if repo_type == "models" else repo_type + "/"
    return JSONResponse({"commitOid": oid, "commitUrl": f"{request.base_url}{prefix}{namespace}/{name}/commit/{oid}",
                         "pullRequestUrl": None})


@write.post("/api/{repo_type}/{namespace}/{name}/tag/{revision}")
async def tag(repo_type: str, namespace: str, name: str, revision: str, request: Request) -> Response:
    body = await request.json()
    _git(_repo(repo_type, namespace, name), "tag", body["tag"], revision)
    return JSONResponse({}, status_code=200)


if __name__ == "__main__":
    server.app.router.routes[:0] = write.routes  # before olah's own routes, which would answer first
    server.main()
