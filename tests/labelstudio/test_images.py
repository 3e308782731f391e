"""Decoding every image kind, and fetching every URL kind through real local HTTP servers."""

import base64
import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from ls_fakes import LEGACY_TOKEN, png_bytes
from PIL import Image

from ml_backend.errors import ImageError
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.images import ImageCache, decode_image, to_array


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but holds no pixels (a decompression bomb's header)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# -- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_common_formats_decode_to_rgb(fmt):
    img = decode_image(encode(Image.new("RGB", (20, 10), (10, 200, 30)), fmt))
    assert img.mode == "RGB" and img.size == (20, 10)
    assert np.abs(np.asarray(img)[5, 5].astype(int) - (10, 200, 30)).max() < 8


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixel = np.asarray(decode_image(data))[0, 0]
    assert pixel[0] > 200 and pixel[2] < 50


def test_16bit_tiff_scaled_by_robust_percentiles():
    arr = np.tile(np.linspace(1000, 5000, 200), (50, 1)).astype(np.uint16)
    arr[0, 0] = 65535  # one hot pixel must not squash the rest
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(encode(img, "TIFF")))
    assert out.shape == (50, 200, 3) and (out[..., 0] == out[..., 1]).all()
    assert out[10, 100, 0] in range(120, 136)  # mid value lands mid-range
    assert out[10, 0, 0] == 0 and out[10, -1, 0] == 255
    assert len(np.unique(out[10, :, 0])) > 150  # contrast kept


def test_constant_16bit_image_is_black_not_an_error():
    img = Image.fromarray(np.full((10, 10), 777, dtype=np.uint16))
    assert np.asarray(decode_image(encode(img, "TIFF"))).max() == 0


def test_float_tiff():
    img = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10))
    out = np.asarray(decode_image(encode(img, "TIFF")))
    assert out.min() == 0 and out.max() == 255


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
    la = np.asarray(decode_image(encode(Image.new("LA", (2, 2), (0, 0)), "PNG")))
    assert tuple(la[0, 0]) == (255, 255, 255)


def test_grayscale_palette_cmyk_and_bilevel():
    assert tuple(np.asarray(decode_image(encode(Image.new("L", (3, 3), 90), "PNG")))[1, 1]) == (
        90,
        90,
        90,
    )
    pal = Image.new("RGB", (3, 3), (0, 128, 255)).convert("P")
    assert decode_image(encode(pal, "PNG")).mode == "RGB"
    cmyk = decode_image(encode(Image.new("CMYK", (3, 3), (0, 0, 0, 0)), "JPEG"))
    assert np.asarray(cmyk).min() > 240  # no ink = white
    assert decode_image(encode(Image.new("1", (3, 3), 1), "PNG")).mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image at all", png_bytes()[:60]])
def test_corrupt_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_image(data)


def test_decompression_bombs_are_refused():
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        decode_image(png_header_only(5000, 5000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="bomb"):  # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS)
        decode_image(png_header_only(30000, 30000), max_pixels=10**10)
    assert Image.MAX_IMAGE_PIXELS != 1_000_000  # no process-wide side effect


def test_to_array_squeezes_the_whole_frame():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (90, 0, 100, 50))  # evidence at the right edge
    arr = to_array(img, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert arr[8, -1, 0] > 200  # not cropped away


# -- fetching --------------------------------------------------------------------------------


@pytest.fixture
def cache(settings):
    return ImageCache(settings, LabelStudioClient(settings))


@pytest.fixture
def open_cache(settings):
    """A cache that may also fetch from the fake outside host (127.0.0.1 listed in IMAGE_HOSTS)."""
    settings = settings.with_overrides(image_hosts=("127.0.0.1",))
    return ImageCache(settings, LabelStudioClient(settings))


def test_every_url_kind_and_where_the_token_goes(fake, open_cache):
    for name, color in [
        ("up.png", (255, 0, 0)),
        ("local.png", (0, 255, 0)),
        ("cloud.png", (0, 0, 255)),
    ]:
        fake.files[name] = png_bytes(color)
    fake.files["ext.png"] = png_bytes((255, 255, 0))
    fake.files["a.png"] = png_bytes((9, 9, 9))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((1, 2, 3))).decode()
    items = [
        (1, "/data/upload/7/up.png"),
        (2, "/data/local-files/?d=local.png"),
        (3, "s3://bucket/cloud.png"),
        (4, "gs://bucket/cloud.png"),
        (5, "azure-blob://bucket/cloud.png"),
        (6, f"{fake.ext.url}/img/ext.png"),
        (7, f"{fake.ls.url}/data/upload/7/up.png"),
        (8, data_uri),
        (10, f"{fake.ls.url}/to-ext"),  # LS redirecting outside: header dropped
    ]
    arrays, ok, failures = open_cache.fetch_arrays(items)
    assert failures == {} and ok == [i for i, _ in items]
    assert arrays.shape == (9, 32, 32, 3) and arrays.dtype == np.uint8
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 255), (0, 0, 255), (255, 255, 0),
                (255, 0, 0), (1, 2, 3), (9, 9, 9)]  # fmt: skip
    assert [tuple(a[16, 16]) for a in arrays] == expected
    for role, _method, path, auth in fake.log:
        if role == "ls":
            assert auth == f"Token {LEGACY_TOKEN}", path
        else:
            assert auth is None, (role, path)
    presigned = [p for r, _m, p, _a in fake.log if r == "ls" and "/presign/" in p]
    assert sorted(p.split("/")[2] for p in presigned) == ["3", "4", "5"]  # task id in the path
    assert fake.requests_to("cloud") and fake.requests_to("ext")


def test_token_never_follows_a_detour_back_to_label_studio(fake, open_cache):
    """An outside host chose the URL of the hop back to Label Studio: no token there, even
    though it is Label Studio's origin (it could be any API path, with our token)."""
    fake.files["up.png"] = png_bytes()
    fake.routes[("GET", "/bounce")] = lambda h: h.send(
        302, b"", headers={"Location": f"{fake.ext.url}/to-ls"}
    )
    _, ok, failures = open_cache.fetch_arrays(
        [(9, f"{fake.ext.url}/to-ls"), (11, f"{fake.ls.url}/bounce")]
    )
    assert ok == [] and "HTTP 401" in failures[9] and "HTTP 401" in failures[11]
    hops = [(role, path.split("?")[0], auth) for role, _m, path, auth in fake.log]
    token = f"Token {LEGACY_TOKEN}"
    assert ("ls", "/bounce", token) in hops  # the chain started on Label Studio: token there
    landed = [auth for role, path, auth in hops if role == "ls" and path == "/data/upload/1/a.png"]
    assert landed == [None, None]  # after the detour: never


def test_second_fetch_hits_the_disk_cache(fake, cache, settings):
    fake.files["up.png"] = png_bytes()
    first, _, _ = cache.fetch_arrays([(1, "/data/upload/1/up.png")])
    before = len(fake.log)
    again = ImageCache(settings, None)  # a fresh process would need no token for cached images
    second, ok, failures = again.fetch_arrays([(1, "/data/upload/1/up.png")])
    assert len(fake.log) == before and ok == [1] and not failures
    assert np.array_equal(first, second)
    assert len(list((settings.model_dir / "cache" / "images").rglob("*.npy"))) == 1
    assert not list((settings.model_dir / "cache" / "images").rglob("*.tmp"))


def test_broken_images_are_reported_not_raised(fake, open_cache, caplog):
    fake.files["good.png"] = png_bytes()
    fake.files["corrupt.png"] = b"garbage"
    fake.files["bomb.png"] = png_header_only(30000, 30000)
    items = [
        (1, "/data/upload/1/good.png"),
        (2, "/data/upload/1/missing.png"),
        (3, "/data/upload/1/corrupt.png"),
        (4, "/data/upload/1/bomb.png"),
        (5, f"{fake.ext.url}/slow.png"),
        (6, "ftp://example.org/x.png"),
        (7, "http://127.0.0.1:9/refused.png"),
        (
            8,
            f"{fake.ext.url}/data/upload/1/good.png?sig=abc",
        ),  # LS file on another origin: no token
    ]
    with caplog.at_level(logging.WARNING):
        arrays, ok, failures = open_cache.fetch_arrays(items)
    assert ok == [1] and arrays.shape == (1, 32, 32, 3)
    assert set(failures) == {2, 3, 4, 5, 6, 7, 8}
    assert "LABEL_STUDIO_URL" in failures[8] and "sig=abc" not in failures[8]
    assert "404" in failures[2] and "timed out" in failures[5] and "scheme" in failures[6]
    assert "bomb" in failures[4]
    text = caplog.text
    assert "task 2" in text and LEGACY_TOKEN not in text and "garbage" not in text


def test_wrong_token_says_what_to_check(fake, settings):
    fake.files["up.png"] = png_bytes()
    bad = ImageCache(settings.with_overrides(label_studio_api_key="f" * 40), None)
    _, ok, failures = bad.fetch_arrays([(1, "/data/upload/1/up.png")])
    assert ok == [] and "401" in failures[1]
    cache = ImageCache(
        settings, LabelStudioClient(settings.with_overrides(label_studio_api_key="f" * 40))
    )
    _, _, failures = cache.fetch_arrays([(1, "/data/upload/1/up.png")])
    assert "LABEL_STUDIO_API_KEY" in failures[1]


def test_presigned_query_never_logged(fake, cache, caplog):
    with caplog.at_level(logging.WARNING):
        _, _, failures = cache.fetch_arrays([(3, "s3://bucket/nothing.png")])
    assert "404" in failures[3] and "secret" not in failures[3] and "secret" not in caplog.text


def test_empty_and_progress(fake, cache, caplog):
    arrays, ok, failures = cache.fetch_arrays([])
    assert arrays.shape == (0, 32, 32, 3) and ok == [] and failures == {}
    fake.files["up.png"] = png_bytes()
    with caplog.at_level(logging.INFO, logger="ml_backend.labelstudio.images"):
        arrays, ok, _ = cache.fetch_arrays([(i, "/data/upload/1/up.png") for i in range(120)])
    assert len(ok) == 120 and "images: 120/120 (100%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ml_backend.labelstudio.images"):
        _, ok, _ = cache.fetch_lazy([(i, "/data/upload/1/up.png") for i in range(120)])
    assert len(ok) == 120 and "images: 120/120 (100%), 120 from cache" in caplog.text


def test_lazy_fetch_of_a_cached_pool_starts_no_threads_and_fetches_only_misses(
    fake, cache, monkeypatch, caplog
):
    """Cache hits are checked in the calling thread (a stat each); only misses go to the
    fetch pool, and the progress lines count hits and misses together."""
    from ml_backend.labelstudio import images

    fake.files["up.png"] = png_bytes()
    items = [(i, f"/data/upload/1/up.png?{i}") for i in range(150)]
    cache.fetch_arrays(items[:120])
    real_pool, submitted = images.ThreadPoolExecutor, []

    class Counting(real_pool):
        def map(self, fn, iterable):
            iterable = list(iterable)
            submitted.extend(iterable)
            return super().map(fn, iterable)

    monkeypatch.setattr(images, "ThreadPoolExecutor", Counting)
    with caplog.at_level(logging.INFO, logger="ml_backend.labelstudio.images"):
        _, ok, failures = cache.fetch_lazy(items)
    assert ok == list(range(150)) and failures == {} and submitted == list(range(120, 150))
    assert "images: 150/150 (100%), 120 from cache" in caplog.text
    submitted.clear()
    _, ok, _ = cache.fetch_lazy(items)
    assert ok == list(range(150)) and submitted == []


def test_native_sizes_read_headers_and_leave_out_broken_images(settings):
    def uri(width, height):
        buf = io.BytesIO()
        Image.new("L", (width, height)).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    cache = ImageCache(settings.with_overrides(image_size=0))
    assert cache.size == 224  # auto, before the caller knows the project's size
    items = [(1, uri(28, 28)), (2, uri(40, 30)), (3, "data:image/png;base64,bm90IGFuIGltYWdl")]
    assert cache.native_sizes(items) == [(28, 28), (40, 30)]
    assert ImageCache(settings, size=32).size == 32


def test_lazy_fetch_reads_no_cached_pixels_and_rows_match(fake, cache, settings, monkeypatch):
    """``fetch_lazy``: the same rows as ``fetch_arrays``, failures known up front, and images
    already cached are not read until a row is asked for, then only that row."""
    colours = [(10 * i, 200 - 10 * i, 7) for i in range(6)]
    for i, colour in enumerate(colours):
        fake.files[f"{i}.png"] = png_bytes(colour)
    items = [(i + 1, f"/data/upload/1/{i}.png") for i in range(6)] + [(9, "/data/upload/1/no.png")]
    arrays, ok, failures = cache.fetch_arrays(items)
    assert ok == [1, 2, 3, 4, 5, 6] and set(failures) == {9}

    reads = []
    real_load = np.load

    def load(path, *args, **kwargs):
        if path.exists():  # not the attempt on the one image that was never cached
            reads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    before = len(fake.log)
    lazy, ok_lazy, failures_lazy = ImageCache(settings, None).fetch_lazy(items)
    assert ok_lazy == ok and set(failures_lazy) == {9} and reads == []
    assert len(fake.log) == before + 1  # only the image that is not cached was asked for again
    assert lazy.shape == arrays.shape and lazy.dtype == np.uint8 and len(lazy) == 6
    assert np.array_equal(lazy[2], arrays[2]) and len(reads) == 1
    assert np.array_equal(lazy[1:4], arrays[1:4])
    assert np.array_equal(lazy[np.array([5, 0])], arrays[[5, 0]])
    assert np.array_equal(np.take(lazy, [3, 3, 1], axis=0), arrays[[3, 3, 1]])
    assert np.array_equal(lazy[:, 16, 16], arrays[:, 16, 16])
    assert np.array_equal(lazy[4, 16, 16], arrays[4, 16, 16]) and lazy[-1].shape == (32, 32, 3)
    assert np.array_equal(np.asarray(lazy), arrays) and np.array_equal(lazy.in_memory(), arrays)


def test_lazy_fetch_repairs_a_damaged_cache_and_never_raises_later(fake, cache, settings, caplog):
    """A truncated cache file is fetched again at ``fetch_lazy`` time; an entry removed after it
    is fetched again when read; one whose source is gone too reads black, with a warning."""
    fake.files["a.png"] = png_bytes((255, 0, 0))
    fake.files["b.png"] = png_bytes((0, 255, 0))
    items = [(1, "/data/upload/1/a.png"), (2, "/data/upload/1/b.png")]
    cache.fetch_arrays(items)
    path_a, path_b = (cache.path_for(url) for _, url in items)
    path_a.write_bytes(path_a.read_bytes()[:100])  # truncated
    lazy, ok, failures = cache.fetch_lazy(items)
    assert ok == [1, 2] and not failures and path_a.stat().st_size == 128 + 32 * 32 * 3
    path_b.unlink()
    assert tuple(lazy[1][16, 16]) == (0, 255, 0) and path_b.exists()  # fetched again
    path_a.unlink()
    del fake.files["a.png"]
    with caplog.at_level(logging.WARNING):
        row = lazy[0]
    assert not row.any() and "task 1: cached image gone" in caplog.text


def test_entries_seen_whole_are_not_checked_again_in_this_process(
    fake, cache, settings, monkeypatch
):
    """The next ``fetch_lazy`` of this process trusts entries an earlier one saw (no stat): one
    deleted since is fetched again when read, and one whose source is gone too leaves the
    memo, so the check after that reports it as a failure again."""
    from ml_backend.labelstudio import images

    fake.files["a.png"] = png_bytes((255, 0, 0))
    fake.files["b.png"] = png_bytes((0, 255, 0))
    items = [(1, "/data/upload/1/a.png"), (2, "/data/upload/1/b.png")]
    _, ok, _ = cache.fetch_lazy(items)
    assert ok == [1, 2]
    stats, real_stat = [], os.stat

    def counting_stat(path, *args, **kwargs):
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(images.os, "stat", counting_stat)
    path_a = cache.path_for(items[0][1])
    path_a.unlink()
    del fake.files["a.png"]
    lazy, ok, failures = ImageCache(settings, None).fetch_lazy(items)
    assert ok == [1, 2] and not failures and not [s for s in stats if s.endswith(".npy")]
    assert tuple(lazy[1][16, 16]) == (0, 255, 0)
    assert not lazy[0].any()  # gone at the source too: black, with a warning, and forgotten
    _, ok, failures = cache.fetch_lazy(items)
    assert ok == [2] and set(failures) == {1}


def test_a_pool_larger_than_the_memo_limit_is_not_held(fake, cache, monkeypatch):
    from ml_backend.labelstudio import images

    fake.files["up.png"] = png_bytes()
    items = [(i, f"/data/upload/1/up.png?{i}") for i in range(6)]
    monkeypatch.setattr(images, "KNOWN_LIMIT", 4)
    cache.fetch_lazy(items[:3])
    assert len(cache._known) == 3
    cache.fetch_lazy(items[:4])  # one more fits
    assert len(cache._known) == 4
    cache.fetch_lazy(items[2:5])  # does not: the memo starts over with this pool
    assert sorted(cache._known) == sorted(url for _, url in items[2:5])
    cache.fetch_lazy(items)  # larger than the limit: nothing held
    assert len(cache._known) == 0
