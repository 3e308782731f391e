"""Which stored model version a command uses: ``--version``, else the served one, else the newest.

"Served" is what the last job published (the status store in Redis, when ``REDIS_URL`` is set
and reachable); a cold-start ordering is not a model, so then the newest version on disk is used.
"""

from __future__ import annotations

import logging

from ml_backend.config import Settings
from ml_backend.errors import ConfigError, ModelNotReady
from ml_backend.model.storage import ModelStore, version_number

log = logging.getLogger(__name__)


def served_version(settings: Settings, project: int) -> str | None:
    """The version the backend serves for ``project`` now, or None (no Redis, none yet)."""
    if not settings.redis_url:
        return None
    from redis import Redis
    from redis.exceptions import RedisError

    from ml_backend.jobs.state import StatusStore

    client = Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return StatusStore(client).model_version(project)
    except RedisError as exc:
        log.warning("cannot ask Redis which version is served (%s); using the newest", exc)
        return None
    finally:
        client.close()


def pick_version(settings: Settings, project: int, requested: str | None) -> tuple[str, str]:
    """``(version, why)``: the version to load and a few words on why that one.

    Raises:
        ConfigError: ``requested`` is not a version name.
        ModelNotReady: the project has no (such) version on disk.
    """
    store = ModelStore(settings.model_dir)
    on_disk = [info.version for info in store.versions(project)]
    if requested:
        try:
            version_number(requested)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if requested not in on_disk:
            raise ModelNotReady(
                f"project {project} has no version {requested} in {store.project_dir(project)}; "
                f"there are: {', '.join(on_disk) or 'none'}"
            )
        return requested, "asked for"
    if not on_disk:
        raise ModelNotReady(
            f"project {project} has no trained version in {store.project_dir(project)} "
            "(MODEL_DIR); label a few tasks and let it train first"
        )
    served = served_version(settings, project)
    if served in on_disk:
        return served, "served now"
    return on_disk[-1], "newest on disk" + (f"; {served} is served" if served else "")
