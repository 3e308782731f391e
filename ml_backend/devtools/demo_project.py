"""Build a Label Studio project the way a user would, through Label Studio's own API.

Shared by ``python -m ml_backend demo``, the end-to-end tests and the e2e benchmark: create the
project from ``label_config.xml``, import generated images (mostly as local files behind a
local-files storage, some as uploads), connect the backend as Settings > Model does, and
annotate tasks. Ground truth comes from the file names the generator wrote.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import quote

import requests

from ml_backend.devtools.synthetic import write_dataset

log = logging.getLogger(__name__)

LABEL_CONFIG = Path(__file__).resolve().parents[2] / "label_config.xml"
_NAME = re.compile(r"img_\d{5}\.png")


class LabelStudioAPI:
    """A few Label Studio REST calls with an ``Authorization`` header (legacy token or JWT).

    Args:
        url: Label Studio's base URL.
        token: a legacy token (sent as ``Token``); for a PAT pass ``scheme="Bearer"`` and an
            access token.
    """

    def __init__(self, url: str, token: str, scheme: str = "Token"):
        self.url = url.rstrip("/")
        self.token = token
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"{scheme} {token}"

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204), **kwargs):
        """One request; raises with Label Studio's answer when the status is unexpected."""
        reply = self.session.request(method, f"{self.url}{path}", timeout=120, **kwargs)
        if reply.status_code not in expect:
            raise RuntimeError(f"{method} {path} -> {reply.status_code}: {reply.text[:500]}")
        return reply.json() if reply.content else None

    def create_project(self, title: str, label_config: str | None = None) -> int:
        """A new project (through the SDK, as scripts usually do); returns its id."""
        from label_studio_sdk import LabelStudio

        sdk = LabelStudio(base_url=self.url, api_key=self.token)
        config = label_config or LABEL_CONFIG.read_text()
        return sdk.projects.create(title=title, label_config=config).id

    def project(self, project: int, fields: tuple[str, ...] | None = None) -> dict:
        """The project's settings (``model_version``, ``sampling``, ...); ``fields``: only
        these (``?include=``: Label Studio then skips counting the project's tasks)."""
        params = {"include": ",".join(fields)} if fields else None
        return self.call("GET", f"/api/projects/{project}/", params=params)

    def update_project(self, project: int, **fields) -> dict:
        """PATCH project fields."""
        return self.call("PATCH", f"/api/projects/{project}/", json=fields)

    def add_local_storage(self, project: int, path: Path) -> int:
        """A local-files storage on ``path`` (needed before LS serves ``/data/local-files/``)."""
        reply = self.call(
            "POST",
            "/api/storages/localfiles/",
            json={"project": project, "path": str(path), "title": "generated images",
                  "use_blob_urls": True},
        )  # fmt: skip
        return reply["id"]

    def connect_backend(
        self, project: int, backend_url: str, title: str = "active learning"
    ) -> dict:
        """Connect an ML backend exactly as Settings > Model > Connect Model does."""
        return self.call(
            "POST", "/api/ml", json={"project": project, "url": backend_url, "title": title}
        )

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project with annotations and predictions (all pages)."""
        out, page = [], 1
        while True:
            reply = self.session.get(
                f"{self.url}/api/tasks/",
                params={"project": project, "page": page, "page_size": 500, "fields": "all"},
                timeout=120,
            )
            if reply.status_code == 404:  # past the last page
                break
            reply.raise_for_status()
            batch = reply.json()["tasks"]
            out.extend(batch)
            if len(batch) < 500:
                break
            page += 1
        return out

    def next_task(self, project: int) -> dict:
        """What "Label All Tasks" serves next (``GET /api/projects/<id>/next/``)."""
        return self.call("GET", f"/api/projects/{project}/next/")

    def annotate(self, task: int, label: str, from_name: str = "choice", to_name: str = "image"):
        """Submit a choice annotation, as the labeling page's Submit button does."""
        result = [{"from_name": from_name, "to_name": to_name, "type": "choices",
                   "value": {"choices": [label]}}]  # fmt: skip
        return self.call("POST", f"/api/tasks/{task}/annotations/", json={"result": result})

    def model_versions(self, project: int) -> dict:
        """``{version: prediction count}`` of the project's stored predictions."""
        return self.call("GET", f"/api/projects/{project}/model-versions/")


def image_name(url: str) -> str | None:
    """The generator's file name inside a task's image URL (uploads get a prefix)."""
    found = _NAME.findall(url)
    return found[-1] if found else None


def import_images(
    api: LabelStudioAPI,
    project: int,
    document_root: Path,
    n: int,
    *,
    uploads: int = 0,
    seed: int = 0,
    size: int = 64,
) -> dict[int, str]:
    """Generate ``n`` images and import them; returns ``{task_id: true label}``.

    The first ``n - uploads`` become local files under ``document_root/project-<id>/`` (a
    local-files storage is added for that folder); the rest are uploaded through the import
    endpoint, as dragging files into the Import dialog does.
    """
    folder = Path(document_root) / f"project-{project}"
    pairs = write_dataset(folder, n, seed=seed, size=size)
    truth = {path.name: label for path, label in pairs}
    api.add_local_storage(project, folder)
    local, uploaded = pairs[: n - uploads], pairs[n - uploads :]
    if local:
        rel = folder.relative_to(document_root)
        items = [{"image": f"/data/local-files/?d={quote(f'{rel}/{p.name}')}"} for p, _ in local]
        api.call("POST", f"/api/projects/{project}/import", json=items)
    for start in range(0, len(uploaded), 50):
        chunk = uploaded[start : start + 50]
        # One form field per file: Label Studio reads one file per field name.
        files = [
            (f"file{i}", (p.name, p.read_bytes(), "image/png")) for i, (p, _) in enumerate(chunk)
        ]
        api.call("POST", f"/api/projects/{project}/import", files=files)
    tasks = api.tasks(project)
    out = {}
    for task in tasks:
        name = image_name(task["data"].get("image", ""))
        if name in truth:
            out[task["id"]] = truth[name]
    if len(out) != n:
        raise RuntimeError(
            f"imported {n} images but found {len(out)} matching tasks in project {project}"
        )
    log.info("project %s: imported %d images (%d uploaded)", project, n, len(uploaded))
    return out
