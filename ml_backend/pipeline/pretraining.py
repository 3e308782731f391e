"""The self-supervised pretraining job: the project's own backbone, from its pool of images.

Runs as its own RQ job (``jobs.pretraining``), asked for by a training job that found no
current backbone (``pretraining_due``). It reads the tasks from the task index the training job
wrote (no listing of Label Studio), the pixels from the image cache (fetching what is missing),
pretrains a SimCLR ResNet18 (``model.pretrain``) within ``PRETRAIN_BUDGET_S`` /
``PRETRAIN_EPOCHS`` and stores it as ``MODEL_DIR/<project>/backbones/b<N>/``. A training job run
without a queue (tests, the simulator) pretrains inline through the same ``pretrain_pool``.

The job runs one slice of ``PRETRAIN_SLICE_S`` seconds and returns ``continue``; the queue side
(``jobs.pretraining``) then enqueues the next slice, which goes on from the checkpoint this one
saved. Between slices a worker takes the waiting training jobs (round robin over the queues).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable

from ml_backend.config import Settings
from ml_backend.errors import LabelStudioUnavailable
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.labelstudio.labels import LabelSpec
from ml_backend.model.backbones import BackboneStore
from ml_backend.model.network import build_model, resolve_device
from ml_backend.model.pretrain import pretrain_backbone
from ml_backend.pipeline.pool import Pool, build_pool
from ml_backend.pipeline.task_index import TaskIndex

log = logging.getLogger(__name__)

# The backbone is pretrained again when the pool has grown by this factor since the last time.
PRETRAIN_AGAIN_AT = 1.5
BACKBONES_KEPT = 2


def pretraining_due(found, pool_size: int, image_size: int) -> str | None:
    """Why the project needs a new backbone, or None when ``found`` (``BackboneStore.latest``'s
    ``(name, state, meta)`` or None) is current for a pool of ``pool_size`` images."""
    if found is None:
        return "the project has no self-supervised backbone yet"
    name, _, meta = found
    if int(meta.get("image_size", 0)) != image_size:
        return (
            f"{name} was pretrained at {meta.get('image_size')} px, the project is at {image_size}"
        )
    was = max(1, int(meta.get("pool_size", 0)))
    if pool_size >= PRETRAIN_AGAIN_AT * was:
        return f"the pool grew from {was} to {pool_size} images since {name}"
    return None


# A slice yields to a waiting training job once it has run this share of PRETRAIN_SLICE_S.
YIELD_AFTER = 1 / 3


def yield_to_training(waiting: Callable[[], bool], slice_s: float) -> Callable[[float], bool]:
    """``pause_early`` for a slice: True once it has run ``YIELD_AFTER`` of ``slice_s`` and
    ``waiting()`` (a training job is queued) says so; ``waiting`` is asked once a second at most."""
    asked = [-1.0]

    def pause(ran: float) -> bool:
        if ran < YIELD_AFTER * slice_s or ran - asked[0] < 1.0:
            return False
        asked[0] = ran
        return waiting()

    return pause


def slice_seconds(settings: Settings, load_s: float) -> float | None:
    """How long this slice of a pretraining may run: ``PRETRAIN_SLICE_S``, at least 4x the
    seconds it took to read the pool (so a large pool is not read more than it is trained on),
    None when slicing is off."""
    if settings.pretrain_slice_s <= 0:
        return None
    return max(float(settings.pretrain_slice_s), 4.0 * load_s)


def pretrain_pool(
    settings: Settings,
    project_id: int,
    pool: Pool,
    device,
    progress: Callable[..., None] | None = None,
    sliced: bool = False,
    context: dict | None = None,
    training_waiting: Callable[[], bool] | None = None,
) -> dict:
    """Pretrain a backbone on ``pool``'s images and store it; returns ``{"backbone", "epochs",
    "seconds", "loss", "images", "image_size", "state_dict"}``. Starts from the PRETRAINED
    weights when they load (domain adaptation), else from the seeded random init.

    With ``sliced`` (the RQ job), the run goes on from the project's checkpoint when there is
    one, and pauses after ``slice_seconds``: it then saves the checkpoint and returns
    ``{"continue": True, "epochs", "seconds", "images_seen", ...}`` without a backbone;
    ``context`` (JSON) is kept beside the checkpoint (``BackboneStore.checkpoint_context``).
    ``training_waiting`` (a training job is queued) ends the slice early, after a third of it."""
    size = int(pool.images.shape[1])
    initial, source = build_model(
        len(pool.label_names), settings.pretrained, log=log, seed=settings.seed
    )
    store = BackboneStore(settings.model_dir)
    # What a checkpoint must match to be gone on from (else it is deleted and the run starts over).
    info = {"image_size": size, "init": source, "seed": settings.seed,
            "batch_size": max(16, settings.batch_size)}  # fmt: skip
    resume = store.load_checkpoint(project_id, info) if sliced else None
    t0 = time.monotonic()
    images = pool.images
    images = images.in_memory() if hasattr(images, "in_memory") else images  # read once
    slice_s = slice_seconds(settings, time.monotonic() - t0) if sliced else None
    done_s = float(resume["elapsed"]) if resume else 0.0
    log.info(
        "project %s: self-supervised pretraining on %d images at %d px (budget %d s, from %s%s)",
        project_id, len(pool.task_ids), size, settings.pretrain_budget_s, source,
        f", going on after {done_s:.0f} s" if resume else "",
    )  # fmt: skip
    report = progress or (lambda **_: None)
    report(stage="pretraining", budget_s=settings.pretrain_budget_s)
    try:
        result = pretrain_backbone(
            images,
            budget_s=settings.pretrain_budget_s,
            max_epochs=settings.pretrain_epochs,
            batch_size=info["batch_size"],  # 64 beat 128 at the same budget (more steps)
            seed=settings.seed,
            device=device,
            init_state=initial.state_dict()
            if source == "imagenet" or source.startswith("file:")
            else None,
            progress=lambda row: report(
                stage="pretraining", budget_s=settings.pretrain_budget_s, **row
            ),
            log=log,
            slice_s=slice_s,
            resume=resume,
            pause_early=yield_to_training(training_waiting, slice_s)
            if slice_s is not None and training_waiting is not None
            else None,
        )
    except Exception:
        store.drop_checkpoint(project_id)  # a diverged or broken run does not go on from here
        raise
    if not result.finished:
        store.save_checkpoint(project_id, result.checkpoint, info, context)
        log.info(
            "project %s: pretraining paused after %.0f of %d s (epoch %d); it goes on after the "
            "waiting retrains", project_id, result.seconds, settings.pretrain_budget_s,
            result.epochs,
        )  # fmt: skip
        return {"continue": True, "epochs": result.epochs, "seconds": result.seconds,
                "images_seen": result.images_seen, "images": len(pool.task_ids),
                "image_size": size}  # fmt: skip
    name = store.save(
        project_id,
        result,
        image_size=size,
        pool_key=hashlib.sha256(pool.task_ids.astype("int64").tobytes()).hexdigest()[:16],
        pool_size=len(pool.task_ids),
    )
    store.drop_checkpoint(project_id)
    store.prune(project_id, keep=BACKBONES_KEPT)
    log.info(
        "project %s: backbone %s: %d epochs in %.0f s, final loss %.3f",
        project_id,
        name,
        result.epochs,
        result.seconds,
        result.loss if result.loss is not None else float("nan"),
    )
    return {
        "backbone": name,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "loss": result.loss,
        "images": len(pool.task_ids),
        "image_size": size,
        "state_dict": result.state_dict,
    }


def _label_spec(client, project_id: int, store: BackboneStore) -> LabelSpec:
    """The project's labeling config from Label Studio; when it is unreachable and a pretraining
    is under way, the config its last slice read (a slice needs no more from Label Studio than
    its cached images)."""
    try:
        return client.label_spec(project_id)
    except LabelStudioUnavailable:
        saved = (store.checkpoint_context(project_id) or {}).get("spec")
        if not saved:
            raise
        log.warning("project %s: Label Studio is unreachable; the pretraining goes on with the "
                    "labeling config its last slice read", project_id)  # fmt: skip
        return LabelSpec(**{**saved, "labels": tuple(saved["labels"]),
                            "other_controls": frozenset(saved["other_controls"])})  # fmt: skip


def _training_waiting(settings: Settings, status) -> Callable[[], bool] | None:
    """Whether a training job is queued (any project), from the status store's Redis; None
    without one (tests, direct calls)."""
    redis = getattr(status, "redis", None)
    if redis is None:
        return None
    from ml_backend.jobs.pretraining import training_waiting  # the queue side, by name

    return lambda: training_waiting(redis, settings)


def _spec_context(spec) -> dict:
    if not dataclasses.is_dataclass(spec):
        return {}
    fields = dataclasses.asdict(spec)
    return {"spec": {**fields, "labels": list(fields["labels"]),
                     "other_controls": sorted(fields["other_controls"])}}  # fmt: skip


def pretrain_project(
    project_id: int,
    reason: str,
    *,
    settings: Settings,
    status=None,
    progress: Callable[..., None] | None = None,
    client=None,
    image_cache=None,
) -> dict:
    """The pretraining job's body for one project.

    Args:
        project_id: the Label Studio project id.
        reason: why it was asked for (the training job's words).
        settings: the deployment's settings (per-project knobs from the status store apply).
        status: the StatusStore (knobs, the project's image size), or None.
        progress: called with per-epoch fields (``epoch``, ``loss``, ``seconds_left``).
        client, image_cache: injected in tests; built from ``settings`` otherwise.

    Returns:
        ``{"outcome", ...}``; with ``backbone`` (and ``epochs``, ``seconds``, ``loss``) when a
        new backbone was stored.
    """
    from ml_backend.pipeline.training import effective_settings  # the same knobs as training

    params = status.project_params(project_id) if status is not None else {}
    settings = effective_settings(settings, params)
    if not settings.self_supervised or settings.pretrain_budget_s <= 0:
        return {"outcome": "not run: SELF_SUPERVISED is off or PRETRAIN_BUDGET_S is 0"}
    state = TaskIndex(settings.model_dir, project_id).load()
    size = settings.image_size or (status.image_size(project_id) if status is not None else None)
    if state is None or not size:
        return {"outcome": "not run: no training job has read the project's tasks yet"}
    client = client or LabelStudioClient(settings)
    spec = _label_spec(client, project_id, BackboneStore(settings.model_dir))
    pool = build_pool(state["tasks"], spec, image_cache or ImageCache(settings, client, size),
                      lazy=True)  # fmt: skip
    if len(pool.task_ids) == 0:
        return {"outcome": "not run: no task has a usable image"}
    why = pretraining_due(BackboneStore(settings.model_dir).latest(project_id),
                          len(pool.task_ids), int(pool.images.shape[1]))  # fmt: skip
    if why is None:
        BackboneStore(settings.model_dir).drop_checkpoint(project_id)
        return {"outcome": "not needed: the project's backbone is current"}
    log.info("project %s: pretraining (%s): %s", project_id, reason, why)
    done = pretrain_pool(settings, project_id, pool, resolve_device(settings.device), progress,
                         sliced=True, context=_spec_context(spec),
                         training_waiting=_training_waiting(settings, status))  # fmt: skip
    if done.get("continue"):
        return {"outcome": f"paused after {done['seconds']:.0f} of "
                           f"{settings.pretrain_budget_s} s", "why": why, **done}  # fmt: skip
    done.pop("state_dict")
    return {"outcome": f"pretrained {done['backbone']}", "why": why, **done}
