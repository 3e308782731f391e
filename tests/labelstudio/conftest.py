"""Fixtures for the Label Studio tests: the fake servers of ``ls_fakes`` and Settings for them,
and ``live_ls``, one real Label Studio 1.23.2 for the session's ``-m e2e`` tests."""

from __future__ import annotations

import pytest
from ls_fakes import LEGACY_TOKEN, LIVE_COLORS, LIVE_PAGE_SIZE_MAX, FakeLS, Server, png_bytes

from ml_backend.config import Settings
from ml_backend.devtools.local_services import LS_VENV, LabelStudioServer

__all__ = ["LEGACY_TOKEN", "FakeLS", "Server", "png_bytes"]  # tests/benchmarks import FakeLS here


@pytest.fixture
def fake():
    servers = FakeLS()
    yield servers
    servers.close()


@pytest.fixture
def settings(fake, tmp_path):
    return Settings(
        label_studio_url=fake.ls.url,
        label_studio_api_key=LEGACY_TOKEN,
        model_dir=tmp_path / "models",
        image_size=32,
        image_fetch_workers=4,
        image_fetch_timeout=0.5,
    )


class _CappedLabelStudio(LabelStudioServer):
    def environment(self) -> dict[str, str]:
        return {**super().environment(), "TASK_API_PAGE_SIZE_MAX": str(LIVE_PAGE_SIZE_MAX)}


@pytest.fixture(scope="session")
def live_ls(tmp_path_factory, missing_real_part):
    """A throw-away Label Studio (own data dir, free port, legacy token, local files served,
    ML backends and webhooks on 127.0.0.1 allowed, TASK_API_PAGE_SIZE_MAX=100)."""
    if not (LS_VENV / "bin" / "label-studio").exists():
        missing_real_part(
            f"Label Studio 1.23.2 is not installed at {LS_VENV} (the e2e installer puts it there)"
        )
    server = _CappedLabelStudio(tmp_path_factory.mktemp("ls"))
    dataset = server.document_root / "dataset"  # LS refuses a storage at the root itself
    dataset.mkdir(parents=True)
    for i, color in enumerate(LIVE_COLORS):
        (dataset / f"img{i}.png").write_bytes(png_bytes(color, size=(24, 24)))
    server.start()
    try:
        yield {"url": server.url, "token": server.token, "files": server.document_root}
    finally:
        server.stop()
