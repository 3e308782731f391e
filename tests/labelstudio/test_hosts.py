"""Where image downloads may go (SSRF): the policy on its own, then through real HTTP servers."""

from __future__ import annotations

import base64

import pytest
from ls_fakes import LEGACY_TOKEN, png_bytes

from ml_backend.errors import ImageError
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.hosts import HostPolicy, is_public
from ml_backend.labelstudio.images import ImageCache

DNS = {
    "ls.example.com": ["10.0.0.2"],
    "images.example.com": ["93.184.216.34"],
    "cdn.example.org": ["93.184.216.35"],
    "intranet.example.com": ["10.1.2.3"],
    "two-faced.example.com": ["93.184.216.36", "192.168.1.5"],
    "metadata.example.com": ["169.254.169.254"],
    "v6-loop.example.com": ["::ffff:127.0.0.1"],
}


def resolve(host, port):
    if host not in DNS:
        raise OSError("no such host")
    return DNS[host]


def policy(*hosts):
    return HostPolicy("http://ls.example.com:8080", tuple(hosts), resolve=resolve)


def check(p, url, redirected_by_ls=False, after_ls=False):
    return p.check(url, redirected_by_ls=redirected_by_ls, after_ls=after_ls)


@pytest.mark.parametrize(
    "address, public",
    [("93.184.216.34", True), ("10.0.0.1", False), ("172.17.0.2", False), ("192.168.0.1", False),
     ("127.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
     ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:10.0.0.1", False),
     ("2606:4700::1111", True), ("224.0.0.1", False), ("not an ip", False)],
)  # fmt: skip
def test_public_addresses(address, public):
    assert is_public(address) is public


def test_label_studio_origin_only_not_its_other_ports():
    p = policy()
    assert check(p, "http://ls.example.com:8080/data/upload/1/a.png") is True  # private is fine
    with pytest.raises(ImageError, match="host ls.example.com is not allowed.*IMAGE_HOSTS"):
        check(p, "http://ls.example.com:6379/")  # same host, another service (Redis?)
    with pytest.raises(ImageError, match="not allowed"):
        check(p, "https://images.example.com/a.png")  # nothing listed: Label Studio only


def test_listed_hosts_and_subdomains_may_be_private():
    p = policy("intranet.example.com", "*.example.org")
    assert check(p, "http://intranet.example.com:9000/a.png") is True
    assert check(p, "https://cdn.example.org/a.png") is True
    assert check(p, "https://deep.cdn.example.org/a.png") is True
    with pytest.raises(ImageError, match="not allowed"):
        check(p, "https://example.org.evil.com/a.png")  # a suffix match on whole labels only
    with pytest.raises(ImageError, match="not allowed"):
        check(p, "https://images.example.com/a.png")


def test_star_allows_public_hosts_only():
    p = policy("*")
    assert check(p, "https://images.example.com/a.png") is False  # public: connect-time check on
    for host, address in [
        ("intranet.example.com", "10.1.2.3"),
        ("two-faced.example.com", "192.168.1.5"),  # one private address is enough to refuse
        ("metadata.example.com", "169.254.169.254"),
        ("v6-loop.example.com", "::ffff:127.0.0.1"),
    ]:
        with pytest.raises(ImageError, match=f"resolves to the non-public address {address}"):
            check(p, f"http://{host}/x")
    with pytest.raises(ImageError, match="cannot resolve host nowhere.example.com"):
        check(p, "http://nowhere.example.com/x")
    for url in ("http://127.0.0.1:6379/", "http://[::1]/", "http://169.254.169.254/latest/"):
        with pytest.raises(ImageError, match="non-public"):
            check(p, url)


def test_what_label_studio_redirects_to_is_followed():
    p = policy()
    assert check(p, "http://minio.internal:9000/b/a.png", redirected_by_ls=True) is True
    # Later hops of a download Label Studio started: public addresses only.
    assert check(p, "https://images.example.com/a.png", after_ls=True) is False
    with pytest.raises(ImageError, match="non-public"):
        check(p, "http://intranet.example.com/a.png", after_ls=True)
    with pytest.raises(ImageError, match="scheme"):
        check(p, "file:///etc/passwd", redirected_by_ls=True)


# -- through real servers: the refused host never sees a request ----------------------------


def _cache(settings, **overrides):
    settings = settings.with_overrides(**overrides)
    return ImageCache(settings, LabelStudioClient(settings))


def test_private_and_unlisted_hosts_are_refused_before_connecting(fake, settings):
    fake.files["ext.png"] = png_bytes()
    port = fake.ext.url.rsplit(":", 1)[1]
    items = [
        (1, f"http://127.0.0.1:{port}/img/ext.png"),
        (2, f"http://localhost:{port}/img/ext.png"),
    ]
    _, ok, failures = _cache(settings).fetch_arrays(items)
    assert ok == [] and all("IMAGE_HOSTS" in failures[i] for i in (1, 2))
    _, ok, failures = _cache(settings, image_hosts=("*",)).fetch_arrays(items)
    assert ok == [] and "non-public address 127.0.0.1" in failures[1]
    assert fake.requests_to("ext") == []
    # Named, a private host is fine; the name is what counts, not the address.
    _, ok, failures = _cache(settings, image_hosts=("localhost",)).fetch_arrays(items)
    assert ok == [2] and "not allowed" in failures[1]
    assert [path for _r, _m, path, auth in fake.requests_to("ext")] == ["/img/ext.png"]
    assert all(auth is None for *_rest, auth in fake.requests_to("ext"))


def test_dns_rebinding_is_refused_at_connect(fake, settings):
    """The name resolves to a public address for the check, then the socket lands on 127.0.0.1."""
    fake.files["ext.png"] = png_bytes()
    port = fake.ext.url.rsplit(":", 1)[1]
    cache = _cache(settings, image_hosts=("*",))
    cache.policy = HostPolicy(
        settings.label_studio_url, ("*",), resolve=lambda h, p: ["93.184.216.34"]
    )
    _, ok, failures = cache.fetch_arrays([(1, f"http://localhost:{port}/img/ext.png")])
    assert ok == [] and "connected to the non-public address 127.0.0.1" in failures[1]
    assert fake.requests_to("ext") == []  # closed before a byte was sent


def test_presign_redirect_to_a_private_bucket_is_followed(fake, settings):
    """The fake bucket is on 127.0.0.1 and not listed: Label Studio sent us there, so it is fine."""
    fake.files["cloud.png"] = png_bytes((0, 0, 255))
    arrays, ok, failures = _cache(settings).fetch_arrays([(3, "s3://bucket/cloud.png")])
    assert failures == {} and ok == [3] and tuple(arrays[0, 16, 16]) == (0, 0, 255)
    assert [auth for *_x, auth in fake.requests_to("cloud")] == [None]


# -- MAX_IMAGE_BYTES ------------------------------------------------------------------------


def test_images_over_max_image_bytes_are_refused(fake, settings):
    big = png_bytes(size=(400, 400), mode="RGB") + b"\0" * 5000

    def unsized(h):  # no Content-Length: HTTP/1.0, the body ends when the connection closes
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        h.wfile.write(big)

    fake.files["big.png"] = big
    fake.files["small.png"] = png_bytes()
    fake.routes[("GET", "/unsized.png")] = unsized
    cache = _cache(settings, max_image_bytes=4096)
    uri = "data:image/png;base64," + base64.b64encode(big).decode()
    items = [
        (1, "/data/upload/1/big.png"),
        (2, "/unsized.png"),
        (3, uri),
        (4, "/data/upload/1/small.png"),
    ]
    _, ok, failures = cache.fetch_arrays(items)
    assert ok == [4]
    assert f"image is {len(big)} bytes (Content-Length), over MAX_IMAGE_BYTES=4096" in failures[1]
    assert "larger than MAX_IMAGE_BYTES=4096 bytes (download stopped there)" in failures[2]
    assert "data: URI image is over MAX_IMAGE_BYTES=4096" in failures[3]
    assert LEGACY_TOKEN not in " ".join(failures.values())
