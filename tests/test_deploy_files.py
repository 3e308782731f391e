"""The deployment files hang together: docker-compose.yml, Dockerfile, .dockerignore, docs.

Docker cannot run containers here, so these check what can be checked without it: Compose
itself reads the file (``docker-compose config``, Debian's ``docker-compose`` package, which
``make test`` installs through ``scripts/install_docker_compose.sh``) and refuses it without the
required secrets; the services and their healthchecks exist, every setting given to the backend
is a real one (``SETTINGS_DOC``), the commands are real CLI commands, the Dockerfile copies what
exists, and every file the deployment files and docs point at is there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ml_backend.config import SETTINGS_DOC

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BACKEND_SERVICES = ("web", "worker", "worker-cpu")
# Read by libraries or Python itself, not by our Settings.
NOT_OUR_SETTINGS = {"TORCH_HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_compose_has_every_service_with_a_healthcheck(compose):
    services = compose["services"]
    assert set(services) == {"redis", "web", "worker", "worker-cpu", "label-studio"}
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    for name in BACKEND_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_backend_services_run_real_cli_commands(compose):
    services = compose["services"]
    assert services["web"]["command"][:4] == ["python", "-m", "ml_backend", "serve"]
    assert "--host" not in services["web"]["command"]  # the address follows the credentials
    assert services["web"]["ports"] == ["${WEB_PORT_BIND:-127.0.0.1}:9090:9090"]
    for name in ("worker", "worker-cpu"):
        assert services[name]["command"] == ["python", "-m", "ml_backend", "worker"]


def test_gpu_worker_reserves_a_gpu_and_cpu_worker_is_a_profile(compose):
    services = compose["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker"]["environment"]["DEVICE"] == "cuda"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["DEVICE"] == "cpu"
    assert "deploy" not in services["worker-cpu"]


def test_backend_environment_names_only_real_settings(compose):
    for name in BACKEND_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = set(env) - set(SETTINGS_DOC) - NOT_OUR_SETTINGS
        assert not unknown, f"{name} sets variables the backend does not read: {unknown}"
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["MODEL_DIR"] == "/data/models"
        assert "models:/data/models" in compose["services"][name]["volumes"]


def test_backend_requires_credentials(compose):
    """No open control routes: compose refuses to start without BASIC_AUTH_PASS, and the
    workers get the credentials too (they put them on the project's webhook)."""
    for name in BACKEND_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["BASIC_AUTH_PASS"].startswith("${BASIC_AUTH_PASS:?"), name
        assert env["BASIC_AUTH_USER"] == "${BASIC_AUTH_USER:-labelstudio}", name
        assert env["IMAGE_HOSTS"] == "${IMAGE_HOSTS:-}", name


def test_label_studio_is_set_up_for_a_local_backend(compose):
    ls = compose["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = ls["environment"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # The batched prediction import: seconds per label on large projects without it.
    from ml_backend.labelstudio.client import FAST_IMPORT_FLAG

    assert env[FAST_IMPORT_FLAG] == "true"
    # The backend's key and Label Studio's admin token are the same variable.
    token = re.match(r"\$\{(\w+)", env["LABEL_STUDIO_USER_TOKEN"]).group(1)
    backend_key = compose["services"]["web"]["environment"]["LABEL_STUDIO_API_KEY"]
    assert backend_key.startswith("${" + token)
    assert any(v.startswith("ls-data:") for v in ls["volumes"])
    assert set(compose["volumes"]) >= {"models", "ls-data", "redis-data"}


def test_dockerfile_installs_requirements_and_fetches_weights(dockerfile):
    assert re.search(r"^FROM python:3\.\d+", dockerfile, re.M)
    assert "pip install -r requirements.txt" in dockerfile
    assert "ResNet18_Weights.IMAGENET1K_V1" in dockerfile
    assert re.search(r"TORCH_HOME=\S+", dockerfile)
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert re.search(r"^USER \w+", dockerfile, re.M), "the image should not run as root"
    cmd = re.search(r"^CMD (.*)$", dockerfile, re.M).group(1)
    assert "serve" in cmd and "--host" not in cmd  # loopback unless BASIC_AUTH_* are set
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    env_names = set(
        re.findall(r"(\w+)=", " ".join(re.findall(r"^ENV .*(?:\n\s+.*)*", dockerfile, re.M)))
    )
    assert env_names - set(SETTINGS_DOC) <= NOT_OUR_SETTINGS | {
        "PIP_NO_CACHE_DIR",
        "PIP_DISABLE_PIP_VERSION_CHECK",
    }


def test_dockerignore_keeps_local_state_out(dockerfile):
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "data", ".env"} <= ignored
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert source not in ignored


# -- Compose itself reads the file ------------------------------------------------------------

SECRETS = {
    "LABEL_STUDIO_TOKEN": "0123456789abcdef0123456789abcdef01234567",
    "LABEL_STUDIO_PASSWORD": "compose-check-password",
    "BASIC_AUTH_PASS": "compose-check-basic",
}


def _compose_command(missing_real_part) -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    missing_real_part("docker-compose is not installed (bash scripts/install_docker_compose.sh)")


def _compose_config(missing_real_part, tmp_path, *args, **env) -> subprocess.CompletedProcess:
    empty = tmp_path / "empty.env"  # a developer's own .env must not change the result
    empty.write_text("")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run(
        [*_compose_command(missing_real_part), "--env-file", str(empty), "-f",
         str(ROOT / "docker-compose.yml"), *args, "config"],
        env=clean, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_docker_compose_config_accepts_the_file(missing_real_part, tmp_path):
    result = _compose_config(missing_real_part, tmp_path, "--profile", "cpu", **SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"redis", "web", "worker", "worker-cpu", "label-studio"}
    web = services["web"]
    assert web["environment"]["BASIC_AUTH_PASS"] == SECRETS["BASIC_AUTH_PASS"]
    assert web["environment"]["LABEL_STUDIO_API_KEY"] == SECRETS["LABEL_STUDIO_TOKEN"]
    port = web["ports"][0]  # "ip:host:container/tcp" (compose 1.x) or a mapping (2.x)
    if isinstance(port, dict):
        port = f"{port['host_ip']}:{port['published']}:{port['target']}"
    assert port.startswith("127.0.0.1:9090:9090"), port
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    ls_env = services["label-studio"]["environment"]
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == SECRETS["LABEL_STUDIO_TOKEN"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_refuses_to_start_without_a_secret(missing_real_part, tmp_path, missing):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    result = _compose_config(missing_real_part, tmp_path, **env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr, result.stderr


# -- every file the deployment files and docs point at exists ---------------------------------

_DOC_FILES = ("README.md", "docker-compose.yml", "Dockerfile", *(f"docs/{p.name}"
              for p in (ROOT / "docs").glob("*.md")))  # fmt: skip


@pytest.mark.parametrize("name", _DOC_FILES)
def test_links_and_named_paths_exist(name):
    """Markdown links and "See docs/...": the kind of reference that pointed at a
    docs/parts/deploy.md that does not exist."""
    path = ROOT / name
    text = path.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    targets += re.findall(
        r"(?<![\w/.-])((?:docs|scripts|tests|ml_backend)/[\w./-]+\.(?:md|sh|py))", text
    )
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        # Markdown links are relative to the file; paths named in prose, to the repository.
        found = (path.parent / target).exists() or (ROOT / target).exists()
        assert found, f"{name} points at {target}, which does not exist"
