"""Where image downloads may go: Label Studio, what it redirects to, and ``IMAGE_HOSTS``.

Image URLs come from task data (any Label Studio user who can import tasks writes them) and from
``/predict`` bodies, so fetching whatever they name is a server-side request forgery: the
backend would call Redis, a cloud metadata endpoint or an intranet service for them. The rule,
checked at every hop of a download (redirects are followed by hand in ``images``):

1. the Label Studio origin (scheme, host and port of LABEL_STUDIO_URL): allowed;
2. a hop Label Studio redirected to (its presign/resolve answer for a storage connected to the
   project, e.g. a bucket or a MinIO on a private network): allowed;
3. a host listed in IMAGE_HOSTS by name (``images.example.com``, ``*.example.com``): allowed,
   private addresses included;
4. with ``*`` in IMAGE_HOSTS, or after Label Studio redirected earlier in the same download: any
   host whose addresses are all public;
5. anything else is refused, naming the host and the setting to change.

"Public" is decided on the addresses the name resolves to, and again on the address the socket
actually connected to (``GuardedAdapter``), so a name that resolves to a public address for the
check and to a private one for the connection (DNS rebinding) is refused too. Through an HTTP
proxy (``HTTP(S)_PROXY``) only the first check applies: the proxy makes the connection.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ml_backend.errors import ImageError

RESOLVE_CACHE_S = 60.0  # a job fetches thousands of images from few hosts
_GUARD = threading.local()  # (host, private_ok) of the download running in this thread


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return (
        scheme,
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(scheme),
    )


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (not private, loopback, link-local, ...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


class PeerRefused(Exception):
    """The socket connected to a non-public address the policy did not allow (not an OSError,
    so urllib3 and requests let it through unwrapped and the reason reaches the log)."""


class HostPolicy:
    """Decides, hop by hop, whether an image URL may be fetched (rules in the module docstring).

    Args:
        ls_url: LABEL_STUDIO_URL.
        image_hosts: the IMAGE_HOSTS entries (lower case): names, ``*.domain`` or ``*``.
        resolve: ``host, port -> addresses``; ``socket.getaddrinfo`` by default (tests inject).
    """

    def __init__(self, ls_url: str, image_hosts: tuple[str, ...] = (), resolve=None):
        self.ls_origin = origin(ls_url)
        self.any_public = "*" in image_hosts
        self.names = frozenset(h for h in image_hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:] for h in image_hosts if h.startswith("*."))
        self._resolve = resolve or _getaddrinfo
        self._cache: dict[tuple[str, int | None], tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def on_ls(self, url: str) -> bool:
        """True when ``url`` is on the Label Studio origin."""
        return origin(url) == self.ls_origin

    def listed(self, host: str) -> bool:
        """True when IMAGE_HOSTS names ``host`` (exactly or as a subdomain; ``*`` does not count)."""
        host = host.lower().rstrip(".")
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def check(self, url: str, *, redirected_by_ls: bool, after_ls: bool) -> bool:
        """Refuse ``url`` or say whether its connection may reach a non-public address.

        Args:
            url: the absolute URL of this hop.
            redirected_by_ls: the previous hop was Label Studio and it redirected here.
            after_ls: some earlier hop of this download was on Label Studio.

        Returns:
            True when private addresses are fine for this hop (rules 1-3), False when the
            connection must reach a public address (rule 4).

        Raises:
            ImageError: the URL is not allowed, with the host and what to change.
        """
        scheme, host, port = origin(url)
        if scheme not in ("http", "https") or not host:
            raise ImageError(f"unsupported image URL scheme {scheme!r}")
        if (scheme, host, port) == self.ls_origin or redirected_by_ls or self.listed(host):
            return True
        if not (self.any_public or after_ls):
            raise ImageError(
                f"host {host} is not allowed for images: URLs must be on Label Studio "
                f"({self.ls_origin[1]}:{self.ls_origin[2]}), where it redirects, or on a host "
                f"in IMAGE_HOSTS; add {host} (or *.its-domain) to IMAGE_HOSTS to allow it"
            )
        private = [a for a in self.addresses(host, port) if not is_public(a)]
        if private:
            raise ImageError(
                f"host {host} resolves to the non-public address {private[0]} (private, "
                f"loopback or link-local); name {host} in IMAGE_HOSTS if it is meant"
            )
        return False

    def addresses(self, host: str, port: int | None) -> list[str]:
        """The addresses ``host`` resolves to (cached for RESOLVE_CACHE_S)."""
        try:
            return [str(ipaddress.ip_address(host))]  # a literal address needs no lookup
        except ValueError:
            pass
        key, now = (host, port), time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        try:
            found = list(self._resolve(host, port))
        except OSError:
            raise ImageError(f"cannot resolve host {host}") from None
        if not found:
            raise ImageError(f"cannot resolve host {host}")
        with self._lock:
            self._cache[key] = (now + RESOLVE_CACHE_S, found)
        return found


def _getaddrinfo(host: str, port: int | None) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


class guard:  # noqa: N801 (used like a function: ``with guard(host, private_ok): ...``)
    """While active in this thread, connections to ``host`` must reach a public address unless
    ``private_ok``."""

    def __init__(self, host: str, private_ok: bool):
        self.value = (host.lower().strip("[]").rstrip("."), private_ok)

    def __enter__(self):
        _GUARD.value = self.value

    def __exit__(self, *exc):
        _GUARD.value = None


def _check_peer(conn_host: str, sock: socket.socket) -> None:
    expected = getattr(_GUARD, "value", None)
    if expected is None or expected[1]:
        return
    if conn_host.lower().strip("[]").rstrip(".") != expected[0]:
        return  # a proxy's connection: the proxy reaches the host, not us
    peer = sock.getpeername()[0]
    if not is_public(peer):
        sock.close()
        raise PeerRefused(
            f"host {expected[0]} connected to the non-public address {peer}; name it in "
            "IMAGE_HOSTS if it is meant"
        )


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(self.host, sock)
        return sock


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(self.host, sock)
        return sock


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose new connections are checked against the active ``guard``."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }
