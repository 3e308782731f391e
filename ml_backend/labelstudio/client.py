"""Everything the backend asks of Label Studio, over label-studio-sdk 2.x.

SDK calls are used wherever the SDK has them. Three endpoints have no SDK method in 2.1.2 and
are called with ``requests`` (marked "no SDK method"): the model-versions list and delete, and
the token refresh used for image downloads (the SDK refreshes for its own calls but keeps the
access token in a private attribute).

Retries are ours, not the SDK's (``max_retries=0`` there): our backoff is bounded and
configurable, and every failure ends in one named error with the URL and what failed, never
the token.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import requests
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from ml_backend.config import Settings
from ml_backend.errors import ConfigError, LabelStudioUnavailable, ProjectNotFound
from ml_backend.labelstudio.labels import LabelSpec, parse_config
from ml_backend.labelstudio.queue_view import queue_view_data
from ml_backend.labelstudio.webhooks import WebhookAuth, basic_auth_header

log = logging.getLogger(__name__)

# Label Studio 1.23.2's feature flag for its batched prediction import, an environment variable
# of the Label Studio server (docker-compose.yml sets it): without it, every import recounts
# every task of the project.
FAST_IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
T = TypeVar("T")
__all__ = ["QUEUE_VIEW_TITLE", "TASK_FIELDS", "LabelStudioClient", "basic_auth_header"]

QUEUE_VIEW_TITLE = "Active learning queue"
# Only what training and ranking read; ``expand`` makes LS send full annotations, not stubs.
TASK_FIELDS = "id,data,annotations,meta,is_labeled,updated_at"
_RETRY_STATUS = {429, 500, 502, 503, 504}


class _NotFound(LabelStudioUnavailable):
    """HTTP 404 outside a project lookup (e.g. past the last page); handled inside this module."""


class _Rejected(LabelStudioUnavailable):
    """HTTP 400: Label Studio refused what we sent; handled inside this module."""


def _jwt_claims(token: str) -> dict | None:
    """Claims of a JWT without verifying it (we only read token_type and exp), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def _detail(exc: ApiError) -> str:
    """A short reason from an SDK error; never its headers (they carry cookies)."""
    body = exc.body
    if isinstance(body, dict):
        body = body.get("detail") or body.get("validation_errors") or body
    return str(body)[:300]


class LabelStudioClient(WebhookAuth):
    """A Label Studio connection for one backend process.

    Args:
        settings: uses ``label_studio_url`` and ``label_studio_api_key`` (a personal access
            token, which is a JWT refresh token, or a legacy token).
        attempts: tries per call on connection errors, timeouts, 429 and 5xx.
        backoff: first wait in seconds; doubles per try, capped by ``max_backoff``.
        timeout: seconds per HTTP request.
        page_size: tasks per page in ``iter_tasks``.

    Raises:
        ConfigError: LABEL_STUDIO_API_KEY is not set.
        LabelStudioUnavailable: the token is an expired personal access token.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 16.0,
        timeout: float = 60.0,
        page_size: int = 1000,
    ):
        key = settings.label_studio_api_key
        if not key:
            raise ConfigError(
                "LABEL_STUDIO_API_KEY is not set: give the worker a personal access token or legacy "
                "token of a Label Studio user with access to the project (Account & Settings)."
            )
        self.url = settings.label_studio_url.rstrip("/")
        self._key = key
        self._attempts, self._backoff, self._max_backoff = max(1, attempts), backoff, max_backoff
        self._timeout, self._page_size = timeout, page_size
        claims = _jwt_claims(key)
        self._is_pat = bool(claims and claims.get("token_type") == "refresh")
        if self._is_pat and claims.get("exp", float("inf")) < time.time():
            raise LabelStudioUnavailable(
                "LABEL_STUDIO_API_KEY is an expired personal access token: create a new one in "
                "Label Studio (Account & Settings > Personal Access Token)."
            )
        self._access: tuple[str, float] | None = None  # (access token, expiry epoch)
        self._lock = threading.Lock()
        self._http = requests.Session()
        self.sdk = LabelStudio(base_url=self.url, api_key=key, timeout=timeout, max_retries=0)

    # -- retry and error mapping ------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], project: int | None = None) -> T:
        """Run ``fn`` with retries; map failures to our named errors."""
        for attempt in range(1, self._attempts + 1):
            try:
                return fn()
            except ApiError as exc:
                status = exc.status_code or 0
                if status in (401, 403):
                    raise LabelStudioUnavailable(
                        f"Label Studio at {self.url} refused the credentials (HTTP {status}) while "
                        f"{what}: check LABEL_STUDIO_API_KEY (a personal access token or legacy "
                        "token of a user with access to the project; legacy tokens must be enabled "
                        "in the organization for 1.23)."
                    ) from None
                if status == 404 and project is not None:
                    raise ProjectNotFound(
                        f"Label Studio at {self.url} has no project {project} (HTTP 404 while "
                        f"{what}); it was deleted or the id is wrong."
                    ) from None
                if status not in _RETRY_STATUS:
                    kind = {404: _NotFound, 400: _Rejected}.get(status, LabelStudioUnavailable)
                    raise kind(
                        f"Label Studio at {self.url} answered HTTP {status} while {what}: {_detail(exc)}"
                    ) from None
                reason = f"HTTP {status}"
            except (httpx.TransportError, requests.ConnectionError, requests.Timeout) as exc:
                reason = type(exc).__name__
            except json.JSONDecodeError:
                reason = "a reply that is not JSON (a proxy error page?)"
            if attempt == self._attempts:
                break
            delay = min(self._backoff * 2 ** (attempt - 1), self._max_backoff)
            log.warning(
                "Label Studio at %s: %s while %s; retry %d/%d in %.1fs",
                self.url,
                reason,
                what,
                attempt,
                self._attempts - 1,
                delay,
            )
            time.sleep(delay)
        raise LabelStudioUnavailable(
            f"Label Studio at {self.url} is unavailable ({reason} while {what}, "
            f"{self._attempts} tries): check that it is running and LABEL_STUDIO_URL is right."
        )

    def _raw(self, method: str, path: str, **kwargs) -> requests.Response:
        """One hand-written request (for endpoints the SDK lacks); raises ApiError like the SDK."""
        response = self._http.request(
            method, self.url + path, headers=self.auth_header(), timeout=self._timeout, **kwargs
        )
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text[:300]
            raise ApiError(status_code=response.status_code, body=body)
        return response

    # -- authentication ---------------------------------------------------------------------

    def access_token(self) -> str:
        """A token usable in an Authorization header right now.

        For a personal access token: a short-lived access token from ``POST
        /api/token/refresh/`` (no SDK method returns it), cached until 30 s before it expires.
        For a legacy token: the token itself.
        """
        if not self._is_pat:
            return self._key
        with self._lock:
            if self._access and self._access[1] - 30 > time.time():
                return self._access[0]

            def refresh() -> str:
                return self._http.post(
                    f"{self.url}/api/token/refresh/",
                    json={"refresh": self._key},
                    timeout=self._timeout,
                )

            response = self._call("refreshing the access token", lambda: self._checked(refresh()))
            token = response.json()["access"]
            expiry = (_jwt_claims(token) or {}).get("exp", time.time() + 60)
            self._access = (token, float(expiry))
            return token

    @staticmethod
    def _checked(response: requests.Response) -> requests.Response:
        if response.status_code >= 400:
            raise ApiError(status_code=response.status_code, body=response.text[:300])
        return response

    def auth_header(self) -> dict[str, str]:
        """``{"Authorization": ...}`` for requests to the Label Studio host only."""
        scheme = "Bearer" if self._is_pat else "Token"
        return {"Authorization": f"{scheme} {self.access_token()}"}

    # -- projects and tasks -----------------------------------------------------------------

    def project(self, pid: int, fields: tuple[str, ...] | None = None) -> dict:
        """The project as a dict (``label_config``, ``model_version``, ``sampling``, ...).

        ``fields``: only these (``?include=``). Label Studio computes every count of the
        project for a plain read (0.3 s at 100,000 tasks, seconds while it imports); a job
        reads the project several times, so it asks for what it uses (0.05 s there)."""
        if fields:
            got = self._call(
                f"reading project {pid}",
                lambda: self._raw("GET", f"/api/projects/{int(pid)}/",
                                  params={"include": ",".join(fields)}),
                project=pid,
            )  # fmt: skip
            return got.json()
        got = self._call(
            f"reading project {pid}", lambda: self.sdk.projects.get(id=pid), project=pid
        )
        return got.model_dump()

    def label_spec(self, pid: int) -> LabelSpec:
        """The project's Image + Choices pair (raises LabelConfigError when it has none)."""
        return parse_config(self.project(pid, fields=("label_config",))["label_config"])

    def iter_tasks(self, pid: int, updated_after: str | None = None) -> Iterator[dict]:
        """Every task of the project with full annotations, one page in memory at a time; with
        ``updated_after`` (an ISO time of Label Studio's clock) only the tasks whose
        ``updated_at`` is later (Label Studio bumps it when an annotation of the task is saved
        or deleted or the task changes, not for predictions imported in bulk; a new task has
        its creation time).

        Yields dicts with ``id, data, annotations, meta, is_labeled, updated_at`` (``data`` URLs
        resolved by Label Studio, e.g. cloud URIs become ``/tasks/<id>/resolve/?fileuri=...``).

        Paging ends at the ``total`` Label Studio reports, at an empty page or at its 404
        "Invalid page", never at a short page: a server with ``TASK_API_PAGE_SIZE_MAX`` below
        our page size answers every page short (said once in the log).

        Raises:
            LabelStudioUnavailable: Label Studio answered the same page twice (it ignores the
                page number), so paging on would never end or would repeat tasks.
        """
        options = {"additional_query_parameters": {"expand": "annotations"}}
        query = None
        if updated_after is not None:
            item = {"filter": "filter:tasks:updated_at", "operator": "greater",
                    "type": "Datetime", "value": updated_after}  # fmt: skip
            query = json.dumps({"filters": {"conjunction": "and", "items": [item]}})
        page, seen, previous_first, said_short = 1, 0, None, False
        while True:

            def fetch(page=page):
                return self.sdk.tasks.list(
                    project=pid,
                    page=page,
                    page_size=self._page_size,
                    fields="all",
                    include=TASK_FIELDS,
                    query=query,
                    request_options=options,
                )

            try:
                pager = self._call(f"listing tasks of project {pid} (page {page})", fetch)
            except _NotFound:
                if page > 1:
                    return  # LS answers 404 "Invalid page" past the end
                raise ProjectNotFound(f"Label Studio at {self.url} has no project {pid}.") from None
            items = [
                item.model_dump(exclude_none=True) if hasattr(item, "model_dump") else dict(item)
                for item in pager.items or []
            ]
            if not items:
                return
            first = items[0].get("id")
            if first is not None and first == previous_first:
                raise LabelStudioUnavailable(
                    f"Label Studio at {self.url} answered the same page twice while listing tasks "
                    f"of project {pid} (page {page} starts with task {first} again); a proxy in "
                    "between may drop the page parameter"
                )
            previous_first = first
            yield from items
            seen += len(items)
            total = getattr(pager.response, "total", None)
            if total is not None and seen >= total:
                return
            # Without a total, a short page may simply be the last one: only say it when we know
            # that more tasks follow.
            if len(items) < self._page_size and total is not None and not said_short:
                said_short = True
                log.warning(
                    "Label Studio at %s returned %d tasks per page where %d were asked (its "
                    "TASK_API_PAGE_SIZE_MAX setting?); paging on until all %d tasks are read",
                    self.url,
                    len(items),
                    self._page_size,
                    total,
                )
            page += 1

    def stored_task(self, task_id: int) -> dict | None:
        """The task as stored: ``data`` with storage URIs as imported (``resolve_uri=false``: a
        resolved read turns ``s3://`` links into Label Studio proxy links, which must never be
        written back), and ``meta``. None when the task no longer exists."""

        def read():
            return self.sdk.tasks.get(
                id=str(task_id),
                request_options={"additional_query_parameters": {"resolve_uri": "false"}},
            )

        try:
            task = self._call(f"reading task {task_id}", read)
        except _NotFound:
            return None
        return task.model_dump() if hasattr(task, "model_dump") else dict(task)

    def update_task(self, task_id: int, *, data: dict | None = None, meta: dict | None = None):
        """Replace the task's ``data`` and/or ``meta`` (as read by ``stored_task``)."""
        fields = {k: v for k, v in (("data", data), ("meta", meta)) if v is not None}
        self._call(
            f"updating task {task_id}", lambda: self.sdk.tasks.update(id=str(task_id), **fields)
        )

    # -- predictions and versions -------------------------------------------------------------

    def import_predictions(self, pid: int, items: list[dict], chunk: int = 1000) -> int:
        """Bulk-import predictions; returns how many Label Studio created.

        LS skips invalid results silently (so created < sent is logged), and rejects a whole
        chunk with 400 when one task id is unknown (deleted meanwhile): such a chunk is split in
        halves until the bad items are isolated and dropped, so one stale task costs log2(chunk)
        extra requests, not the chunk.
        """
        created = 0
        for start in range(0, len(items), chunk):
            created += self._import_chunk(pid, items[start : start + chunk])
        if created < len(items):
            log.warning(
                "Label Studio created %d of %d predictions for project %d; the rest were rejected "
                "(unknown tasks or results that do not match the labeling config)",
                created,
                len(items),
                pid,
            )
        return created

    def _import_chunk(self, pid: int, part: list[dict]) -> int:
        def post():
            return self.sdk.projects.import_predictions(id=pid, request=part)

        try:
            return int(
                self._call(f"importing {len(part)} predictions", post, project=pid).created or 0
            )
        except _Rejected as exc:
            if len(part) == 1:
                log.warning(
                    "Label Studio rejected the prediction for task %s: %s", part[0].get("task"), exc
                )
                return 0
        half = len(part) // 2
        return self._import_chunk(pid, part[:half]) + self._import_chunk(pid, part[half:])

    def activate_version(self, pid: int, version: str) -> None:
        """Show ``version``'s predictions and serve the queue by lowest prediction score."""
        self._call(
            f"activating model version {version} in project {pid}",
            lambda: self.sdk.projects.update(
                id=pid,
                model_version=version,
                show_collab_predictions=True,
                sampling="Uncertainty sampling",
            ),
            project=pid,
        )

    def model_versions(self, pid: int) -> dict[str, int]:
        """``{model_version: prediction count}`` of the project's stored predictions."""
        # no SDK method in 2.1.2
        path = f"/api/projects/{pid}/model-versions/"
        got = self._call(
            f"listing model versions of project {pid}", lambda: self._raw("GET", path), project=pid
        )
        body = got.json()
        if isinstance(body, dict) and "static" in body:  # ?extended=true shape, just in case
            return {v["model_version"]: int(v.get("count", 0)) for v in body["static"] or []}
        return {str(k): int(v) for k, v in (body or {}).items()}

    def delete_version(self, pid: int, version: str) -> None:
        """Delete every prediction of ``version`` in the project."""
        # no SDK method in 2.1.2
        path = f"/api/projects/{pid}/model-versions/"
        self._call(
            f"deleting predictions of {version} in project {pid}",
            lambda: self._raw("DELETE", path, json={"model_version": version}),
            project=pid,
        )

    def ensure_queue_view(self, pid: int) -> int:
        """Create or update the Data Manager tab "Active learning queue"; returns its id.

        Unlabeled tasks ordered by ``tasks:predictions_score`` ascending (the score of the active
        version's prediction): with "Label Tasks As Displayed" it serves the same order as
        "Label All Tasks" does for a single annotator, and keeps it with several.
        """
        data = {
            "title": QUEUE_VIEW_TITLE,
            "ordering": ["tasks:predictions_score"],
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:completed_at",
                        "operator": "empty",
                        "type": "Datetime",
                        "value": True,
                    }
                ],
            },
        }
        views = self._call(
            f"listing views of project {pid}", lambda: self.sdk.views.list(project=pid), project=pid
        )
        for view in views or []:
            existing = getattr(view, "data", None) or {}
            if existing.get("title") != QUEUE_VIEW_TITLE:
                continue
            columns = None if existing.get("hiddenColumns") else self._columns(pid)
            wanted = queue_view_data(data, existing, columns)
            if {k: existing.get(k) for k in wanted} != wanted:  # unchanged: no request
                self._call(
                    f"updating the queue view of project {pid}",
                    lambda view=view, wanted=wanted: self.sdk.views.update(
                        id=str(view.id), project=pid, data=wanted
                    ),
                    project=pid,
                )
            return int(view.id)
        wanted = queue_view_data(data, None, self._columns(pid))
        created = self._call(
            f"creating the queue view of project {pid}",
            lambda: self.sdk.views.create(project=pid, data=wanted),
            project=pid,
        )
        return int(created.id)

    def _columns(self, pid: int) -> list[dict] | None:
        """The Data Manager's columns of the project (``GET /api/dm/columns/``; no SDK method),
        or None when they cannot be read (Label Studio 1.23.2's defaults are used then)."""
        try:
            reply = self._call(
                f"reading the Data Manager columns of project {pid}",
                lambda: self._raw("GET", "/api/dm/columns/", params={"project": pid}),
                project=pid,
            )
            columns = reply.json().get("columns")
        except (LabelStudioUnavailable, ValueError, AttributeError):
            return None
        return columns if isinstance(columns, list) else None

    def close(self) -> None:
        """Release HTTP connections."""
        self._http.close()
