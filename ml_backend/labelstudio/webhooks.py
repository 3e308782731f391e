"""The project's webhook to us: Label Studio creates it without headers, we add basic auth.

A mixin of ``LabelStudioClient`` (it uses the client's ``_call`` retries and ``sdk``), kept here
so the client module stays about reading and writing projects.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def basic_auth_header(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP basic auth: ``Basic <base64(user:password)>``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _webhook_url(url: str) -> str:
    """``<backend>/webhook`` normalised for comparison (lower-case scheme and host, default port
    dropped, no trailing slash)."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, {"http": 80, "https": 443}.get(scheme)) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    if not path.endswith("/webhook"):
        path += "/webhook"
    return f"{scheme}://{netloc}{path}"


class WebhookAuth:
    """``backend_urls`` and ``ensure_webhook_auth`` for ``LabelStudioClient``."""

    def backend_urls(self, pid: int, basic_auth_user: str) -> list[str]:
        """URLs of the project's ML backends that log in to us as ``basic_auth_user``.

        Label Studio already sends these URLs our credentials on every health, setup and predict
        call, so giving the same header to their ``/webhook`` tells them nothing new; a backend
        connected without basic auth, or as another user, is never given our credentials.
        (Listing makes Label Studio call /setup of each backend, as its UI does.)
        """
        backends = self._call(
            f"listing the ML backends of project {pid}",
            lambda: self.sdk.ml.list(project=pid),
            project=pid,
        )
        return [
            b.url
            for b in backends or []
            if str(getattr(b, "auth_method", "") or "").upper() == "BASIC_AUTH"
            and getattr(b, "basic_auth_user", None) == basic_auth_user
            and b.url
        ]

    def ensure_webhook_auth(self, pid: int, url: str, header: str) -> str:
        """Make the project's webhook to ``url`` carry ``Authorization: <header>``.

        Label Studio creates the webhook ``<backend url>/webhook`` without headers when the
        backend is connected, and a backend with BASIC_AUTH_* set refuses such calls (401).
        Idempotent: other headers of the webhook and its actions are kept, and nothing is sent
        when the header is already there. The header value is never logged.

        Args:
            pid: the project id.
            url: the backend's URL as Label Studio knows it (``http://web:9090``) or the
                webhook's (``http://web:9090/webhook``).
            header: the Authorization value, e.g. ``basic_auth_header(user, password)``.

        Returns:
            ``"set"`` (a webhook was changed), ``"unchanged"`` (it already carried the header)
            or ``"missing"`` (no webhook of the project points at ``<url>/webhook``).
        """
        target = _webhook_url(url)
        hooks = self._call(
            f"listing the webhooks of project {pid}",
            lambda: self.sdk.webhooks.list(project=str(pid)),
            project=pid,
        )
        ours = [h for h in hooks or [] if h.project == pid and _webhook_url(h.url) == target]
        if not ours:
            log.warning(
                "project %d: no webhook to %s; Label Studio creates it when the backend is "
                "connected (Settings > Model): reconnect the backend or add the webhook by hand",
                pid,
                target,
            )
            return "missing"
        outcome = "unchanged"
        for hook in ours:
            headers = dict(hook.headers) if isinstance(hook.headers, dict) else {}
            current = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
            if current == header:
                continue
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = header
            # Label Studio's PATCH replaces the action list with what is sent (empty if absent).
            actions = list(hook.actions or [])
            self._call(
                f"setting the authorization header of webhook {hook.id} in project {pid}",
                lambda hook=hook, headers=headers, actions=actions: self.sdk.webhooks.update(
                    id=hook.id, headers=headers, actions=actions
                ),
                project=pid,
            )
            log.info("project %d: webhook %d to %s now sends our basic auth", pid, hook.id, target)
            outcome = "set"
        return outcome
