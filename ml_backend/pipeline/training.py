"""The retraining job: Label Studio annotations in, a new version and a reordered queue out.

Orchestration only; the work lives in ``labelstudio`` (tasks, images), ``model`` (train,
predict, store) and ``selection`` (ranking). One run:

1. wait for the project's webhooks to settle, then read the label set and the tasks changed
   since the last job from Label Studio (``task_index``); fetch new images into the disk cache
   (the pool reads cached ones only when a step needs their pixels: ``CachedImages``);
2. the project's self-supervised backbone; when there is none yet, or the pool grew by half, a
   pretraining job of its own is asked for and this job goes on with the backbone it has
   (``pipeline.pretraining``); the pool's embeddings under it and under the PRETRAINED weights
   come from the embedding cache, so only new images are embedded (``model.embeddings``);
3. with at least two labeled classes: the served model (``model.recipe``: a head on frozen
   embeddings, with pseudo-labels or fine-tuned when cross-validation prefers it), no retrain
   when the labeled set and the training knobs are those of the previous version; otherwise:
   cold start, ordering the pool by the strategy's cold-start rule (typicality);
4. nothing changed since the published version (same model, same tasks, same knobs): stop here,
   no new version;
5. the pool's probabilities (the served head on the cached embeddings; a fine-tuned backbone
   embeds once), rank the unlabeled tasks;
6. write the version atomically, push a prediction for each of the top ``QUEUE_DEPTH`` unlabeled
   tasks (every unlabeled task after ``refresh --all-tasks``), switch the project to it
   (``publish``). A failure before the switch leaves the previous
   version serving; after it, the new version stays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from types import SimpleNamespace

import numpy as np
from redis.exceptions import RedisError

from ml_backend.config import PARAM_RULES, Settings
from ml_backend.errors import BackendError
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.model.backbones import BackboneStore
from ml_backend.model.embeddings import (
    EmbeddingCache,
    backbone_key,
    cached_embeddings,
    head_probs,
)
from ml_backend.model.features import backbone_model
from ml_backend.model.inference import predict
from ml_backend.model.network import build_model, resolve_device
from ml_backend.model.recipe import RecipeConfig, train_served_model
from ml_backend.model.sizing import choose_image_size
from ml_backend.model.storage import COLD_START_PREFIX, ModelStore, cold_start_version
from ml_backend.pipeline.pool import Pool, build_pool
from ml_backend.pipeline.pretraining import BACKBONES_KEPT, pretrain_pool, pretraining_due
from ml_backend.pipeline.publish import (
    build_predictions,
    publish,
    queue_rows,
    queue_top,
)
from ml_backend.pipeline.task_index import TaskIndex
from ml_backend.selection import rank

log = logging.getLogger(__name__)

# How often a worker checks that the project's webhook carries our basic-auth header.
WEBHOOK_AUTH_EVERY_S = 600
# Reasons that ask for a retrain even when the labeled set has not changed (`refresh` command).
# Label Studio's START_TRAINING is not one: with "train on every annotation" it comes with each
# submit, and a model trained on exactly these labels is already there.
FORCE_REASONS = ("refresh",)
# Settings a model depends on / a published queue depends on (besides the labels and tasks).
MODEL_KNOBS = ("epochs", "batch_size", "learning_rate", "seed", "pretrained", "self_supervised",
               "pseudo_labels", "label_spreading", "finetune_min_labels")  # fmt: skip
# IMAGE_SIZE=auto reads the size of this many images (evenly spread over the task list).
SIZE_SAMPLE = 64
# From FINETUNE_MIN_LABELS labels a job fine-tunes again (after its head version is live) when
# the labels have grown by this factor since the last fine-tune; jobs between are heads only.
FINETUNE_AGAIN_AT = 1.5
# The backbones (the project's own, the PRETRAINED weights, the last fine-tuned network) are
# compared by cross-validation when one of them is new and when the labels have grown by this
# factor since the last comparison; the jobs between fit heads on the winner only (at 100,000
# tasks that saves reading a second backbone's embeddings and a second cross-validation:
# ~3 s of a label's way to the new order).
COMPARE_AGAIN_AT = 1.25
# Acceptance counts as evidence for ``auto`` from this many scored pre-annotations on.
MIN_ACCEPTANCE_N = 20
QUEUE_KNOBS = ("strategy", "uncertainty", "queue_batch", "shortlist_factor", "queue_depth", "seed",
               "auto_labels_per_class", "auto_min_accuracy")  # fmt: skip


def effective_settings(settings: Settings, params: dict | None) -> Settings:
    """The deployment's settings with the project's own knobs (``PARAM_RULES``) applied.

    Knobs stored before their bounds existed are checked again; a bad one is dropped and logged.
    """
    overrides = {}
    for name, value in (params or {}).items():
        if name not in PARAM_RULES:
            continue
        parse, allowed = PARAM_RULES[name]
        try:
            overrides[name] = parse(value)
        except (ValueError, TypeError):
            log.warning("ignoring the project knob %s=%r: it must be %s", name, value, allowed)
    return settings.with_overrides(**overrides) if overrides else settings


def _key(*parts) -> str:
    """A short stable hash of JSON-able parts (what a model or a published queue was made from)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_key(pool: Pool, settings: Settings, backbone: str | None = None) -> str:
    """Same key, same model: the labeled set, the label list, the image size, the backbone and
    the training knobs."""
    knobs = {k: getattr(settings, k) for k in MODEL_KNOBS}
    return _key(pool.fingerprint(), int(pool.images.shape[1]), backbone, knobs)


def queue_key(basis: str, pool: Pool, settings: Settings) -> str:
    """Same key, same published queue: the model (or cold start) it was ranked with, the pool's
    tasks and labels, and the ranking knobs."""
    return _key(
        basis,
        pool.fingerprint(),
        hashlib.sha256(pool.task_ids.astype("int64").tobytes()).hexdigest(),
        {k: getattr(settings, k) for k in QUEUE_KNOBS},
    )


@dataclasses.dataclass
class _Run:
    """What one job run carries from step to step: where it reports, and its timings."""

    project_id: int
    reason: str
    settings: Settings
    device: object
    client: object
    status: object | None
    snapshot: object = None
    redis: object = None  # the queue's connection (asks for pretraining jobs); None: inline
    timings: dict = dataclasses.field(default_factory=dict)
    # embedding rows this job took from the cache / computed (all passes together)
    embedded: dict = dataclasses.field(default_factory=lambda: {"cached": 0, "computed": 0})
    listing: dict = dataclasses.field(default_factory=dict)  # how the tasks were read
    # backbone key -> the pool's embeddings under it, for this job: a head's probabilities and
    # the ranking reuse what training read, instead of reading the cache again
    embedding_memo: dict = dataclasses.field(default_factory=dict)
    # ``refresh --all-tasks``: this job pre-annotates every unlabeled task, and publishes even
    # when nothing changed
    all_tasks: bool = False
    started: float = dataclasses.field(default_factory=time.monotonic)

    def progress(self, **fields) -> None:
        """Report progress; best effort: a Redis blip must not fail the job (the queue records
        its end once Redis is back)."""
        if self.status is None:
            return
        try:
            self.status.progress(self.project_id, **fields)
        except RedisError as exc:
            log.warning("project %s: progress not recorded (%s)", self.project_id, exc)

    def lap(self, name: str, since: float, less: float = 0.0) -> None:
        """Add the time since ``since`` (minus ``less``) to step ``name`` (a step such as
        embedding can run several times in a job)."""
        key = f"{name}_s"
        elapsed = max(time.monotonic() - since - less, 0.0)
        self.timings[key] = round(self.timings.get(key, 0.0) + elapsed, 3)

    def record_weights(self, source: str) -> None:
        if self.status is not None:  # /health shows whether ImageNet weights were available
            self.status.set_pretrained(source)

    def published(self) -> dict:
        """What the project serves now, as the last publish recorded it."""
        return self.status.published(self.project_id) if self.status is not None else {}

    def unchanged(self, key: str) -> bool:
        """Whether a queue with this key is what Label Studio already serves (never for a job
        asked to pre-annotate every task)."""
        if self.all_tasks or self.reason in FORCE_REASONS:
            return False
        return self.published().get("queue_key") == key


def train_project(
    project_id: int,
    reason: str,
    *,
    settings: Settings,
    redis=None,
    status=None,
    snapshot=None,
    client=None,
    image_cache=None,
) -> dict:
    """The RQ job body: retrain (or cold-start rank) one project and push the new queue.

    Args:
        project_id: the Label Studio project id.
        reason: what triggered the job (webhook action, ``train``, ``refresh``).
        settings: the deployment's settings (per-project knobs from the status store apply on top).
        redis: the queue's Redis connection: a missing backbone is pretrained by a job of its
            own (``jobs.pretraining``). None: pretrained inside this job.
        status: the StatusStore for progress, the queue explanation and what is published, or
            None.
        snapshot: called right before the labels are read (the queue waits for webhooks to
            settle there and marks the moment), or None.
        client, image_cache: injected in tests; built from ``settings`` otherwise.

    Returns:
        ``{"outcome", "model_version", "metrics"}``; the queue records it in the status store.
    """
    params = status.project_params(project_id) if status is not None else {}
    settings = effective_settings(settings, params)
    run = _Run(
        project_id,
        reason,
        settings,
        resolve_device(settings.device),
        client or LabelStudioClient(settings),
        status,
        snapshot,
        redis,
    )
    spec, pool = _fetch(run, image_cache)
    if run.all_tasks:
        log.info("project %s: asked for all tasks: every unlabeled task gets a pre-annotation",
                 project_id)  # fmt: skip
    if len(pool.task_ids) == 0:
        return _finish(run, "nothing to do: no task has a usable image", None, {})
    why_not = pool.trainable_reason(settings.min_labels)
    if why_not:
        log.info(
            "project %s: not training (%s); ordering the queue by diversity (cold start)",
            project_id,
            why_not,
        )
        return _cold_start(run, spec, pool, why_not)
    return _retrain(run, spec, pool)


def _fetch(run: _Run, image_cache):
    run.progress(stage="fetching")
    t0 = time.monotonic()
    spec = run.client.label_spec(run.project_id)
    if run.snapshot is not None:
        run.snapshot()  # labels from here on are in this run; later webhooks get a follow-up
    full = "refresh" if run.reason in FORCE_REASONS else False
    if run.status is not None:
        try:  # after ANNOTATIONS_DELETED (see server.payloads.FULL_LISTING_ACTIONS)
            if run.status.take_full_listing(run.project_id):
                full = "annotations were deleted"
            run.all_tasks = run.status.predict_all_requested(run.project_id)
        except RedisError as exc:
            full = f"Redis unreachable ({type(exc).__name__})"
    tasks, listing = TaskIndex(run.settings.model_dir, run.project_id).read(
        run.client, run.project_id, run.settings.task_resync_s, full=full
    )
    run.listing = listing
    log.info(
        "project %s: %s",
        run.project_id,
        f"read {listing['read']} changed task(s) from Label Studio ({len(tasks)} in the index)"
        if listing["listing"] == "changed"
        else f"listed all {len(tasks)} tasks ({listing['why']})",
    )
    pool = build_pool(
        tasks,
        spec,
        image_cache
        or (lambda items: ImageCache(run.settings, run.client, _image_size(run, items))),
        lazy=True,  # pixels are read only where a step needs them (see _embeddings, pretraining)
    )
    run.lap("fetch", t0)
    log.info(
        "project %s: job started (%s): %d tasks with images at %d px, %d labeled %s, device %s",
        run.project_id,
        run.reason,
        len(pool.task_ids),
        pool.images.shape[1] if pool.images.ndim == 4 else 0,
        pool.n_labeled,
        pool.class_counts(),
        run.device,
    )
    return spec, pool


def _image_size(run: _Run, items: list[tuple[int, str]]) -> int:
    """IMAGE_SIZE, or under ``auto`` the project's size: chosen once from a sample of its images
    (``sizing.choose_image_size``) and kept, so the cache and the models stay valid."""
    if run.settings.image_size:
        return run.settings.image_size
    chosen = run.status.image_size(run.project_id) if run.status is not None else None
    if chosen:
        return chosen
    sample = items[:: max(1, len(items) // SIZE_SAMPLE)][:SIZE_SAMPLE]
    sizes = ImageCache(run.settings, run.client).native_sizes(sample)
    size = choose_image_size(sizes)
    if sizes and run.status is not None:
        run.status.set_image_size(run.project_id, size)
    log.info(
        "project %s: IMAGE_SIZE=auto: %s; images are used at %d px",
        run.project_id,
        f"the median larger side of {len(sizes)} sampled images is "
        f"{sorted(max(w, h) for w, h in sizes)[len(sizes) // 2]} px"
        if sizes
        else "no sample image could be read (tried again next job)",
        size,
    )
    return size


def _backbone(run: _Run, pool: Pool) -> tuple[str, dict, str, dict | None]:
    """The backbone the heads sit on and selection embeds with: ``(name, state_dict, source,
    initial)``, ``initial`` being the PRETRAINED weights' state when the backbone is another one
    (the recipe also tries a head on those: see ``_train``), else None.

    SELF_SUPERVISED=on: the project's own SimCLR backbone (``pipeline.pretraining``). When there
    is none yet for this image size, or the pool has grown by half since, this job asks for a
    pretraining job and goes on with what it has (the current backbone, else the PRETRAINED
    weights); that job asks for a training job once the new backbone is stored. Run without a
    queue (``redis`` None: tests, a direct call), it pretrains here instead. Off: the PRETRAINED
    weights as they are.
    """
    settings, size = run.settings, int(pool.images.shape[1])
    # Seeded: without ImageNet weights the random init is the same network in every job.
    initial, source = build_model(
        len(pool.label_names), settings.pretrained, log=log, seed=settings.seed
    )
    run.record_weights(source)
    if not settings.self_supervised or settings.pretrain_budget_s <= 0:
        return f"{source}@{size}", initial.state_dict(), source, None
    found = BackboneStore(settings.model_dir).latest(run.project_id)
    why = pretraining_due(found, len(pool.task_ids), size)
    if why is not None and run.redis is None:
        t0 = time.monotonic()
        done = pretrain_pool(settings, run.project_id, pool, run.device, run.progress)
        run.lap("pretrain", t0)
        found = (done["backbone"], done["state_dict"], {"epochs": done["epochs"],
                                                         "image_size": size})  # fmt: skip
    elif why is not None:
        _ask_for_pretraining(run, why)
    if found is None or int(found[2].get("image_size", 0)) != size:
        return f"{source}@{size}", initial.state_dict(), source, None
    name, state, meta = found
    return (
        name,
        state,
        f"self-supervised {name} ({meta.get('epochs')} epochs)",
        initial.state_dict(),
    )


def _ask_for_pretraining(run: _Run, why: str) -> None:
    """Ask for the project's pretraining job (``jobs.pretraining``); never fails the job."""
    from ml_backend.jobs.pretraining import RETRY_AFTER_FAILURE_S, request_pretraining

    try:
        answer, job_id = request_pretraining(run.redis, run.settings, run.project_id, why)
    except RedisError as exc:
        log.warning("project %s: pretraining not asked for (Redis: %s); the next job asks again",
                    run.project_id, type(exc).__name__)  # fmt: skip
        return
    if answer == "held back":
        log.warning("project %s: %s, but the last pretraining failed less than %.0f min ago "
                    "(see /status pretraining); not asked for again yet", run.project_id, why,
                    RETRY_AFTER_FAILURE_S / 60)  # fmt: skip
        return
    log.info("project %s: %s: pretraining job %s %s; this job uses the backbone it has",
             run.project_id, why, job_id,
             {"enqueued": "enqueued", "waiting": "already waiting",
              "running": "already running"}[answer])  # fmt: skip


def _embed(run: _Run, pool: Pool, state: dict):
    """Frozen-backbone embeddings of the whole pool (float32 [N, 512])."""
    return _embeddings(run, backbone_model(state, len(pool.label_names)), pool)


def _embeddings(run: _Run, model, pool: Pool) -> np.ndarray:
    """The pool's embeddings under ``model``'s backbone, from the project's embedding cache
    where it has them (``model.embeddings``): only new images and new backbones are computed.
    Read once per backbone and job (``embedding_memo``)."""
    t0 = time.monotonic()
    run.progress(stage="predicting", total=len(pool.task_ids))

    def compute(images):
        _, vectors = predict(
            model,
            images,
            device=run.device,
            batch_size=run.settings.inference_batch_size,
            progress=lambda done, total: run.progress(stage="predicting", done=done, total=total),
        )
        return vectors

    backbone = backbone_key(model, int(pool.images.shape[1]))
    if backbone in run.embedding_memo:
        run.lap("predict", t0)
        return run.embedding_memo[backbone]

    def fanned_out(rows):
        from ml_backend.jobs import fanout  # the queue side, by name

        return fanout.embed_rows(
            run.redis, run.settings, project_id=run.project_id, model=model, backbone=backbone,
            image_size=int(pool.images.shape[1]), items=getattr(pool.images, "items", None),
            rows=rows, compute=lambda part: compute(pool.images[part]),
        )  # fmt: skip

    cache = EmbeddingCache(run.settings.model_dir, run.project_id)
    embeddings, info = cached_embeddings(
        cache, model, pool.images, pool.image_keys, compute, backbone=backbone,
        embed_rows=fanned_out if run.redis is not None else None,
    )  # fmt: skip
    run.embedding_memo[backbone] = embeddings
    run.lap("predict", t0)
    run.embedded["cached"] += info["cached"]
    run.embedded["computed"] += info["computed"]
    log.info(
        "project %s: embedded %d images in %.1f s (%d from the cache, %d computed%s)",
        run.project_id,
        len(pool.task_ids),
        info["seconds"],
        info["cached"],
        info["computed"],
        f", {info['computed'] / max(info['seconds'], 1e-9):.0f} images/s"
        if info["computed"]
        else "",
    )
    return embeddings


def _retrain(run: _Run, spec, pool: Pool) -> dict:
    store = ModelStore(run.settings.model_dir)
    previous = store.latest(run.project_id)
    same_labels = previous is not None and previous.labels == pool.label_names
    backbone, state, source, initial = _backbone(run, pool)
    tuned = _tuned_backbone(run, pool)
    key = model_key(pool, run.settings, backbone + (f"+{tuned[0]}" if tuned else ""))
    retrain = not (
        same_labels and previous.metrics.get("model_key") == key and run.reason not in FORCE_REASONS
    )
    # the version whose model a re-ranked version reuses (its own name when it was trained)
    reused = previous.metrics.get("queue_basis") or previous.version if previous else None
    if not retrain and run.unchanged(queue_key(reused, pool, run.settings)):
        log.info(
            "project %s: labels, tasks and model are those of the served %s; nothing to publish",
            run.project_id,
            run.published().get("version"),
        )
        return _finish(run, "unchanged (labels, tasks and model as published)", None, {})
    metrics: dict = {
        "weights": source,
        "backbone": backbone,
        "image_size": int(pool.images.shape[1]),
        "labels_used": pool.n_labeled,
        "class_counts": pool.class_counts(),
        "acceptance": _acceptance(run, pool),
    }
    t0, embedding_before = time.monotonic(), run.timings.get("predict_s", 0.0)
    if retrain:
        candidates = [(backbone, state, source, None)]
        if initial is not None:
            candidates.append(("PRETRAINED weights", initial, "PRETRAINED", None))
        if tuned is not None:
            name, tuned_state, meta = tuned
            candidates.append(
                (name, tuned_state, f"fine-tuned {name}", float(meta["val_accuracy"]))
            )
        candidates, kept = _keep_choice(run, pool, previous if same_labels else None, candidates)
        model, fitted = _train(run, pool, candidates)
        metrics.update(fitted)
        if kept:
            metrics.update(kept)
    else:
        log.info(
            "project %s: labeled set unchanged since %s; re-ranking without retraining",
            run.project_id,
            previous.version,
        )
        model, _ = store.load(run.project_id, previous.version, device="cpu")
        metrics.update({k: previous.metrics.get(k) for k in REUSED_METRICS})
        metrics["retrained"] = False
    # train_s without the embedding passes inside it (those count under predict_s)
    run.lap("train", t0, less=run.timings.get("predict_s", 0.0) - embedding_before)
    basis = None if retrain else reused
    version = _serve(run, spec, pool, store, model, metrics, key, basis)
    outcome = "trained" if retrain else "re-ranked (labels unchanged)"
    if retrain and _finetune_due(run, pool):
        finetuned = _finetune(run, pool, backbone, state)
        if finetuned is not None:
            tuned_model, fitted = finetuned
            metrics = {**metrics, **fitted, "served_backbone": backbone}
            key = model_key(pool, run.settings, f"{backbone}+{fitted['finetuned_backbone']}")
            version = _serve(run, spec, pool, store, tuned_model, metrics, key, None)
            outcome = "trained (fine-tuned after a head version)"
    return _finish(run, outcome, version, metrics)


def _serve(run: _Run, spec, pool: Pool, store, model, metrics: dict, key: str, basis) -> str:
    """Predict the pool with ``model``, rank it, write the version and publish it; returns the
    version. ``basis``: the version whose model this is when it was not retrained (else None)."""
    probs, embeddings = _predict_pool(run, model, pool)
    accepted = metrics.get("acceptance") or {}
    ranking = _rank(
        run,
        pool,
        probs,
        embeddings,
        val_accuracy=metrics.get("val_accuracy"),
        acceptance=accepted.get("rate") if accepted.get("n", 0) >= MIN_ACCEPTANCE_N else None,
    )
    predicted = [pool.label_names[i] for i in probs.argmax(axis=1)]
    version = store.next_version(run.project_id)
    metrics.update(
        fingerprint=pool.fingerprint(),
        model_key=key,
        queue_key=queue_key(basis or version, pool, run.settings),
        queue_basis=basis or version,
        strategy=ranking.strategy,
        pool_size=len(pool.task_ids),
        skipped_tasks=len(pool.skipped),
        ignored_annotations=len(pool.label_problems),
        device=str(run.device),
        queue_decision=ranking.decision,
        queue_top=queue_top(
            ranking, pool.task_ids, probs, predicted, run.settings.queue_batch, pool.label_names
        ),
        embedded=dict(run.embedded),
        task_listing=dict(run.listing),
    )
    path = store.save(
        run.project_id,
        version,
        model,
        pool.label_names,
        metrics,
        run.timings,
        extra={"image_size": int(pool.images.shape[1])},
    )
    items = _predictions(run, pool, ranking, version, spec, predicted)
    _push(run, items, version, path, metrics)
    _remember_pushed(run, items, version, spec)
    store.prune(run.project_id, run.settings.keep_versions)
    return version


def _tuned_backbone(run: _Run, pool: Pool):
    """The newest fine-tuned network of the project at this image size (``(name, state, meta)``)
    or None; the fast path puts a head on it once it exists."""
    try:
        found = BackboneStore(run.settings.model_dir, kind="finetuned").latest(run.project_id)
    except BackendError as exc:
        log.warning("project %s: fine-tuned network ignored: %s", run.project_id, exc)
        return None
    if found is None or int(found[2].get("image_size", 0)) != int(pool.images.shape[1]):
        return None
    if found[2].get("label_names") != pool.label_names or found[2].get("val_accuracy") is None:
        return None  # fine-tuned for another label set: not comparable
    return found


def _finetune_due(run: _Run, pool: Pool) -> bool:
    """From FINETUNE_MIN_LABELS labels: when no fine-tune was tried yet, or the labels have grown
    by FINETUNE_AGAIN_AT since the last try (won or lost). Every other job is heads only."""
    n = pool.n_labeled
    if n < run.settings.finetune_min_labels:
        return False
    last = BackboneStore(run.settings.model_dir, kind="finetuned").last_try(run.project_id)
    if last is None or int(last.get("image_size", 0)) != int(pool.images.shape[1]):
        return True
    return n >= FINETUNE_AGAIN_AT * max(1, int(last.get("labels", 0)))


def _finetune(run: _Run, pool: Pool, backbone: str, state: dict):
    """The slow step, after the head version is live: fine-tune the whole network from the
    project's backbone, validated on the hash split against the head (``model.recipe``). When it
    wins, it is refit on every label, kept as a fine-tuned network (later jobs put heads on it)
    and returned with its metrics for a second version; else None."""
    t0, embedding_before = time.monotonic(), run.timings.get("predict_s", 0.0)
    labeled = np.flatnonzero(pool.labeled_mask)
    run.progress(stage="training", labels=len(labeled), backbone=backbone, fine_tune=True)
    log.info(
        "project %s: fine-tuning from %s on %d labels (the head version is live meanwhile)",
        run.project_id,
        backbone,
        len(labeled),
    )
    model, fitted = _fit(run, pool, state, _embed(run, pool, state), finetune_min_labels=1)
    store = BackboneStore(run.settings.model_dir, kind="finetuned")
    size = int(pool.images.shape[1])
    store.record_try(
        run.project_id,
        {"labels": len(labeled), "image_size": size, "served": fitted.get("served"),
         "why": fitted.get("why"), "at": time.time()},
    )  # fmt: skip
    run.lap("finetune", t0, less=run.timings.get("predict_s", 0.0) - embedding_before)
    if fitted.get("served") != "finetune":
        log.info(
            "project %s: the fine-tune did not beat the head (%s); next try at %d labels",
            run.project_id,
            fitted.get("why"),
            int(np.ceil(FINETUNE_AGAIN_AT * len(labeled))),
        )
        return None
    name = store.save(
        run.project_id,
        SimpleNamespace(state_dict=model.state_dict(), epochs=0, images_seen=0, seconds=0.0,
                        loss=None),
        image_size=size,
        pool_key=pool.fingerprint(),
        pool_size=len(pool.task_ids),
        extra={"val_accuracy": fitted.get("val_accuracy"), "labels": len(labeled),
               "from": backbone, "label_names": pool.label_names},
    )  # fmt: skip
    store.prune(run.project_id, keep=BACKBONES_KEPT)
    return model, {**fitted, "finetuned_backbone": name, "retrained": True}


REUSED_METRICS = ("val_accuracy", "val_size", "train_size", "served", "why", "candidates",
                  "served_backbone", "backbones_tried", "backbones_compared_at",
                  "backbone_choice")  # fmt: skip


def _keep_choice(run: _Run, pool: Pool, previous, candidates: list[tuple]):
    """``(candidates, kept)``: only the backbone the previous version was served on, with the
    comparison it won (``kept``: metrics to carry over), while the same backbones are in the
    running and the labels have grown by less than ``COMPARE_AGAIN_AT`` since that comparison;
    else every candidate and None."""
    if previous is None or len(candidates) < 2:
        return candidates, None
    m = previous.metrics
    tried, at, served = (
        m.get("backbones_tried") or {},
        m.get("backbones_compared_at"),
        m.get("served_backbone"),
    )
    names = [c[0] for c in candidates]
    if at is None or set(tried) != set(names) or served not in names:
        return candidates, None
    again = int(np.ceil(COMPARE_AGAIN_AT * int(at)))
    if pool.n_labeled >= again:
        return candidates, None
    others = ", ".join(name for name in names if name != served)
    log.info("project %s: heads on %s only (it won over %s at %d labels; compared again from %d)",
             run.project_id, served, others, at, again)  # fmt: skip
    kept = {"backbones_tried": tried, "backbones_compared_at": int(at),
            "backbone_choice": f"{served}, which won over {others} at {at} labels; compared "
                               f"again from {again} labels"}  # fmt: skip
    return [c for c in candidates if c[0] == served], kept


def _train(run: _Run, pool: Pool, candidates: list[tuple]):
    """The fast served model (``model.recipe``): a head on frozen backbone embeddings, with
    pseudo-labels or labels spread over the pool when cross-validation clearly prefers them,
    refit on every label before it is served.

    ``candidates``: ``(name, state_dict, source, known_accuracy)`` backbones, the project's
    self-supervised one first. A head on the PRETRAINED weights (random init without ImageNet)
    is tried too and served when its cross-validated accuracy is higher: SimCLR learns
    invariance to colour and brightness, which is sometimes exactly what tells the classes
    apart (weather, stains). The project's latest fine-tuned network comes with the accuracy it
    had on held-out tasks (``known_accuracy``), since it saw the labels a cross-validation would
    hold out. Ties go to the first.
    """
    labeled = np.flatnonzero(pool.labeled_mask)
    best, tried = None, {}
    for name, state, source, known in candidates:
        embeddings = _embed(run, pool, state)
        run.progress(stage="training", labels=len(labeled), backbone=name)
        # Heads only: the fine-tune is a later step of the job (``_finetune``), after this
        # version is live, and only when it is due.
        model, fitted = _fit(run, pool, state, embeddings, finetune_min_labels=10**9)
        # Cross-validated accuracy first; on a tie (common with a few dozen labels) the
        # backbone whose embeddings put each labeled image next to one of its class
        # (leave-one-out 1-NN on the labeled set); then the first.
        if known is not None:
            # A fine-tuned network saw these labels: a head on it cross-validates too well, so
            # it counts with the accuracy its fine-tune had on held-out tasks.
            fitted = {**fitted, "val_accuracy": known, "why": f"{name} had {known:.3f} on the "
                      "hash split's held-out tasks when it was fine-tuned"}  # fmt: skip
        score = (
            _or_minus(fitted.get("val_accuracy")),
            _loo_1nn(embeddings[labeled], pool.labels[labeled]),
        )
        tried[name] = fitted.get("val_accuracy")
        if best is None or score > best[4]:
            best = (name, model, fitted, source, score)
    name, model, fitted, source, _ = best
    log.info(
        "project %s: serving the %s on %s (%s); validation accuracy %s on %s labels; "
        "backbones tried %s",
        run.project_id,
        fitted.get("served"),
        name,
        fitted.get("why"),
        fitted.get("val_accuracy"),
        fitted.get("val_size"),
        tried,
    )
    extra = {"retrained": True, "served_backbone": name, "backbones_tried": tried}
    if len(candidates) > 1:
        extra["backbones_compared_at"] = len(labeled)
        extra["backbone_choice"] = f"{name}, by cross-validation over {len(labeled)} labels"
    if source == "PRETRAINED":
        extra["served"] = f"{fitted.get('served')} on the {name}"
    return model, {**fitted, **extra}


def _fit(run: _Run, pool: Pool, state: dict, embeddings, finetune_min_labels: int):
    """``model.recipe.train_served_model`` on the pool's labels from backbone ``state``; a
    fine-tune is a candidate from ``finetune_min_labels`` labels on."""
    labeled = np.flatnonzero(pool.labeled_mask)
    fine_tune = finetune_min_labels <= len(labeled)
    return train_served_model(
        pool.images,
        labeled,
        pool.labels[labeled],
        pool.task_ids,
        len(pool.label_names),
        backbone_state=state,
        embeddings=embeddings,
        cfg=dataclasses.replace(
            RecipeConfig.from_settings(run.settings), finetune_min_labels=finetune_min_labels
        ),
        device=run.device,
        progress=lambda info: run.progress(stage="training", fine_tune=fine_tune, **info),
        log=log,
    )


def _or_minus(value) -> float:
    return -1.0 if value is None else float(value)


LOO_ROWS = 2000  # the tie-break looks at this many labeled rows at most (an n x n matrix)


def _loo_1nn(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of labeled rows on standardised embeddings
    (on a fixed sample of ``LOO_ROWS`` rows when there are more, so memory stays bounded)."""
    if len(labels) < 2:
        return 0.0
    if len(labels) > LOO_ROWS:
        rows = np.random.default_rng(0).choice(len(labels), LOO_ROWS, replace=False)
        embeddings, labels = embeddings[rows], labels[rows]
    x = embeddings.astype(np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    squared = (x * x).sum(axis=1)
    dist = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.fill_diagonal(dist, np.inf)
    return float(np.mean(labels[dist.argmin(axis=1)] == labels))


def _acceptance(run: _Run, pool: Pool) -> dict | None:
    """How often annotators kept the pre-filled choice: the labels that arrived since the last
    job, on tasks the backend had pre-annotated, per version; and the running total of the
    newest version with any. Logged; the dashboard plots it; ``auto`` may use it."""
    if run.status is None:
        return None
    labeled = {
        int(t): pool.label_names[int(c)]
        for t, c in zip(
            pool.task_ids[pool.labeled_mask], pool.labels[pool.labeled_mask], strict=True
        )
    }
    new = run.status.score_acceptance(run.project_id, labeled)
    for version, counts in sorted(new.items()):
        log.info(
            "project %s: annotators kept %d of %d pre-filled choices of %s",
            run.project_id,
            counts["kept"],
            counts["n"],
            version,
        )
    totals = run.status.acceptance(run.project_id)
    if not totals:
        return None
    from ml_backend.model.storage import version_number

    newest = max(totals, key=lambda v: version_number(v))
    return {"version": newest, **totals[newest]}


def _remember_pushed(run: _Run, items: list[dict], version: str, spec) -> None:
    """Record each pushed pre-annotation's choice, for ``_acceptance`` once the task is labeled."""
    if run.status is None:
        return
    chosen = {}
    for item in items:
        for region in item.get("result") or []:
            choices = (region.get("value") or {}).get("choices")
            if choices:
                chosen[int(item["task"])] = choices[0]
    run.status.record_pushed(run.project_id, version, chosen)


def _cold_start(run: _Run, spec, pool: Pool, why_not: str) -> dict:
    backbone, state, source, _ = _backbone(run, pool)
    key = queue_key(f"{COLD_START_PREFIX}{backbone}", pool, run.settings)
    if run.unchanged(key):
        log.info("project %s: cold-start order unchanged; nothing to publish", run.project_id)
        return _finish(run, "unchanged (cold-start order as published)", None, {})
    if source != "imagenet" and not source.startswith(("file:", "self-supervised")):
        log.warning(
            "project %s: cold-start embeddings come from %s; the diversity order is rough",
            run.project_id,
            source,
        )
    embeddings = _embed(run, pool, state)
    ranking = _rank(run, pool, None, embeddings)  # no model: the strategy's cold-start order
    version = cold_start_version()
    metrics = {
        "weights": source,
        "backbone": backbone,
        "image_size": int(pool.images.shape[1]),
        "queue_key": key,
        "labels_used": pool.n_labeled,
        "class_counts": pool.class_counts(),
        "not_trained_because": why_not,
        "strategy": ranking.strategy,
        "pool_size": len(pool.task_ids),
        "skipped_tasks": len(pool.skipped),
        "device": str(run.device),
        "queue_decision": ranking.decision,
        "queue_top": queue_top(
            ranking, pool.task_ids, None, None, run.settings.queue_batch, pool.label_names
        ),
    }
    _push(run, _predictions(run, pool, ranking, version, spec, None), version, None, metrics)
    return _finish(run, f"cold start ({why_not})", version, metrics)


def _predict_pool(run: _Run, model, pool: Pool):
    """``(probs, embeddings)`` of the whole pool under the served ``model``: its backbone's
    embeddings (cached: a head on a frozen backbone needs no new pass), then its ``fc``."""
    embeddings = _embeddings(run, model, pool)
    return head_probs(model, embeddings), embeddings


def _rank(run: _Run, pool: Pool, probs, embeddings, val_accuracy=None, acceptance=None):
    """The queue order; ``auto`` decides from the labels per class and the validation accuracy."""
    t0 = time.monotonic()
    settings = run.settings
    evidence = {"labels_per_class": pool.class_counts()}
    if val_accuracy is not None:
        evidence["val_accuracy"] = float(val_accuracy)
    if acceptance is not None:
        evidence["acceptance"] = float(acceptance)
    ranking = rank(
        settings.strategy,
        probs=probs,
        embeddings=embeddings,
        labeled_mask=pool.labeled_mask,
        batch=settings.queue_batch,
        shortlist_factor=settings.shortlist_factor,
        measure=settings.uncertainty,
        seed=settings.seed,
        device=run.device,
        evidence=evidence,
        auto_labels_per_class=settings.auto_labels_per_class,
        auto_min_accuracy=settings.auto_min_accuracy,
        n_classes=len(pool.label_names),
        probcover_radius=settings.probcover_radius or None,  # 0: the purity rule
    )
    run.lap("rank", t0)
    return ranking


def _predictions(run: _Run, pool: Pool, ranking, version: str, spec, predicted) -> list[dict]:
    """Predictions for the top ``QUEUE_DEPTH`` unlabeled tasks (every one when the job was asked
    for all tasks), in queue order."""
    depth = len(ranking.order) if run.all_tasks else run.settings.queue_depth
    rows, scores = queue_rows(ranking.order, depth)
    labels = None if predicted is None else [predicted[i] for i in rows.tolist()]
    return build_predictions(pool.task_ids[rows], scores, version, spec, labels)


def _push(run: _Run, items: list[dict], version: str, path, metrics: dict) -> None:
    t0 = time.monotonic()
    run.progress(stage="pushing", total=len(items))
    try:
        metrics.update(
            publish(
                run.client,
                run.project_id,
                items,
                version,
                ledger=run.status,
                grace=run.settings.prediction_grace,
                explain=metrics.get("queue_top"),
            )
        )
    except Exception:
        if path is not None:  # the version never went live: do not leave it to be served
            shutil.rmtree(path, ignore_errors=True)
        raise
    if run.status is not None:
        run.status.set_published(
            run.project_id,
            {
                "version": version,
                "queue_key": metrics.get("queue_key"),
                "model_key": metrics.get("model_key"),
                "at": run.status.now(),
            },
        )
        if run.all_tasks:  # done: later jobs are back to QUEUE_DEPTH
            try:
                run.status.clear_predict_all(run.project_id)
            except RedisError as exc:
                log.warning("project %s: all-tasks request not cleared (%s)", run.project_id, exc)
    run.lap("push", t0)


def _secure_webhook(run: _Run) -> str | None:
    """With BASIC_AUTH_* set, put our basic-auth header on the project's webhook (Label Studio
    creates it without, and the web app refuses webhooks without it). Checked at the end of a
    job (the webhook exists by then), at most every ``WEBHOOK_AUTH_EVERY_S`` per project."""
    settings, status = run.settings, run.status
    if not (settings.basic_auth_user and settings.basic_auth_pass) or status is None:
        return None
    key = f"mlb:webhook_auth:{run.project_id}"
    if status.redis.exists(key):
        return None
    from ml_backend.labelstudio.client import basic_auth_header

    header = basic_auth_header(settings.basic_auth_user, settings.basic_auth_pass)
    try:
        urls = run.client.backend_urls(run.project_id, settings.basic_auth_user)
        results = [run.client.ensure_webhook_auth(run.project_id, url, header) for url in urls]
    except BackendError as exc:
        log.warning("project %s: could not put basic auth on its webhook: %s", run.project_id, exc)
        return f"webhook auth: {exc}"
    if results and "missing" not in results:
        status.redis.set(key, "1", ex=WEBHOOK_AUTH_EVERY_S)
        return None
    log.warning(
        "project %s: no webhook of Label Studio points at this backend with our login; labels "
        "will not start retrains until it exists (checked again after the next job)",
        run.project_id,
    )
    return "webhook auth: the project's webhook to this backend was not found"


def _finish(run: _Run, outcome: str, version: str | None, metrics: dict) -> dict:
    problem = _secure_webhook(run)
    if problem:
        metrics = {**metrics, "publish_warnings": [*metrics.get("publish_warnings", []), problem]}
    run.timings["total_s"] = round(time.monotonic() - run.started, 3)
    if run.status is not None and metrics.get("queue_top") is not None:
        run.status.queue_top(run.project_id, metrics["queue_top"])
    metrics = {**metrics, "timings": run.timings, **({"all_tasks": True} if run.all_tasks else {})}
    log.info(
        "project %s: job done in %.1f s: %s%s; timings %s",
        run.project_id,
        run.timings["total_s"],
        outcome,
        f", now serving {version}" if version else "",
        run.timings,
    )
    return {"outcome": outcome, "model_version": version, "metrics": metrics}
