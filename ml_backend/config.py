"""Settings: the only place in the package that reads environment variables.

``Settings.from_env()`` builds one frozen object at start; a bad value raises ``ConfigError``
naming the variable, so the process fails before it listens or works. Every field below is a
documented setting (README, "Settings"); ``SETTINGS_DOC`` is the single source of that table.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ml_backend.errors import ConfigError

STRATEGIES = (
    "diversified",
    "uncertainty",
    "coreset",
    "random",
    "typicality",
    "badge",
    "probcover",
    "herding",
    "auto",
)
UNCERTAINTY_MEASURES = ("entropy", "margin", "least_confidence")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# name -> (default, one-line description). Defaults are strings exactly as a user would write them.
SETTINGS_DOC: dict[str, tuple[str | None, str]] = {
    "LABEL_STUDIO_URL": ("http://localhost:8080", "Base URL of your Label Studio server."),
    "LABEL_STUDIO_API_KEY": (
        None,
        "Personal access token or legacy token of a Label Studio user who can read and "
        "annotate the project (Account & Settings). Needed by the worker; never logged.",
    ),
    "REDIS_URL": (
        None,
        "Redis for the job queue and status. `run` starts an embedded Redis when unset; "
        "`serve` and `worker` require it.",
    ),
    "MODEL_DIR": ("./data/models", "Where model versions and the image cache live."),
    "BASIC_AUTH_USER": (
        None,
        "With BASIC_AUTH_PASS: require HTTP basic auth on every route but /health.",
    ),
    "BASIC_AUTH_PASS": (None, "Password for BASIC_AUTH_USER; never logged."),
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR."),
    "DEVICE": (
        "auto",
        "Torch device for training and inference: auto (CUDA when present), cpu, cuda, cuda:N.",
    ),
    "PRETRAINED": (
        "imagenet",
        "imagenet (torchvision weights, downloaded to TORCH_HOME on first use), none (random init), "
        "or a path to a ResNet18 state_dict file.",
    ),
    "IMAGE_SIZE": (
        "auto",
        "Images are resized to this square size (pixels) for training and inference. auto: the "
        "project's typical image size (median larger side of a sample, rounded up to a multiple "
        "of 32, at most 224), chosen once per project and kept; a number wins.",
    ),
    "SELF_SUPERVISED": (
        "on",
        "on: pretrain the ResNet18 backbone on the project's own images (SimCLR), within "
        "PRETRAIN_BUDGET_S, in a job of its own started by the project's first job, and again "
        "when the pool has grown by half; until it is ready jobs use the PRETRAINED weights, "
        "then its embeddings order the queue and feed the head. off: the PRETRAINED weights only.",
    ),
    "PRETRAIN_BUDGET_S": (
        "120",
        "Seconds one self-supervised pretraining may take (a GPU does many more epochs in them).",
    ),
    "PRETRAIN_EPOCHS": (
        "200",
        "Most epochs of one self-supervised pretraining (it stops earlier at PRETRAIN_BUDGET_S).",
    ),
    "PRETRAIN_SLICE_S": (
        "30",
        "A pretraining runs in slices of at most this many seconds: after each it saves its "
        "state, workers take the next waiting training job and the next slice in turn, and the "
        "next slice goes on from the saved state (a killed worker loses one slice). A slice "
        "ends early, after a third of this, when a training job waits. So a retrain waits about "
        "a third of a slice while a pretraining runs, and continuous labeling does not hold "
        "the pretraining up. 0: one job runs the whole budget, after every waiting retrain.",
    ),
    "PSEUDO_LABELS": (
        "on",
        "on: the head may also learn from confident predictions on unlabeled images, when "
        "cross-validation says it helps. off: labels only.",
    ),
    "LABEL_SPREADING": (
        "on",
        "on: the head may also learn from labels spread along a nearest-neighbour graph of the "
        "pool's images (every unlabeled image takes the class its labeled neighbourhood points "
        "to), when cross-validation says it helps; strongest with a few dozen labels. off: no "
        "spreading.",
    ),
    "FINETUNE_MIN_LABELS": (
        "200",
        "From this many labels on, fine-tuning the whole network is tried against the head on "
        "frozen embeddings, after the job's head version is live, and served as a second "
        "version when validation prefers it; tried again when the labels grow by half. Jobs "
        "between fit heads only (also on the last fine-tuned network), in seconds.",
    ),
    "EPOCHS": (
        "0",
        "Epochs of the fine-tune candidate (from FINETUNE_MIN_LABELS labels); 0 picks by label "
        "count (more epochs for fewer labels).",
    ),
    "BATCH_SIZE": ("64", "Training batch size."),
    "LEARNING_RATE": ("0.001", "AdamW learning rate for fine-tuning."),
    "VAL_FRACTION": (
        "0.2",
        "Share of labels (by a hash of the task id) the fine-tune candidate is validated on; "
        "heads are compared by 5-fold cross-validation. The served model is refit on every label.",
    ),
    "SEED": ("0", "Random seed for splits, initialisation and augmentation."),
    "INFERENCE_BATCH_SIZE": ("256", "Batch size for whole-pool inference."),
    "EMBED_CHUNK": (
        "10000",
        "A job with more images than this to embed under one backbone splits them into chunks "
        "of this many, which every worker on the same Redis helps embed (the job too); "
        "0: a job embeds alone.",
    ),
    "STRATEGY": (
        "auto",
        "Queue order: auto (typicality until the model is trusted, then herding), "
        "diversified, badge, uncertainty, coreset, random, typicality, probcover or herding.",
    ),
    "PROBCOVER_RADIUS": (
        "0.5",
        "probcover: radius of the balls on unit-length embeddings, 0.05 to 2, or purity (the "
        "paper's rule: the largest radius whose balls stay inside one k-means group for 95% of "
        "the tasks; measured, it picks 0.2-0.3 on self-supervised CPU backbones, too small).",
    ),
    "UNCERTAINTY": (
        "margin",
        "Uncertainty measure of herding (auto's second phase), diversified and uncertainty: margin, "
        "entropy or least_confidence.",
    ),
    "QUEUE_BATCH": (
        "20",
        "Size of the batch at the top of the queue (the tasks herding, diversified, badge, "
        "probcover or coreset pick together).",
    ),
    "SHORTLIST_FACTOR": (
        "5",
        "diversified: k-center picks the batch among the QUEUE_BATCH x SHORTLIST_FACTOR most "
        "uncertain tasks.",
    ),
    "AUTO_LABELS_PER_CLASS": (
        "3",
        "auto: switch from typicality to herding once there are this many labels per class "
        "on average (and the model's accuracy evidence reaches AUTO_MIN_ACCURACY).",
    ),
    "AUTO_MIN_ACCURACY": (
        "0",
        "auto: validation (or pre-annotation acceptance) accuracy the model needs before the "
        "switch, 0 to 1 (0: no gate; measured, a gate makes auto alternate and lose); ignored "
        "from 4 x AUTO_LABELS_PER_CLASS labels per class on.",
    ),
    "KEEP_VERSIONS": ("3", "Model versions kept on disk per project (the newest ones)."),
    "QUEUE_DEPTH": (
        "100",
        "Unlabeled tasks that get a prediction (queue position + pre-annotation) per published "
        "version: the top of the queue. Label Studio serves only tasks with a current-version "
        "prediction, so keep it above what annotators label between two retrains.",
    ),
    "PREDICTION_GRACE": (
        "86400",
        "Seconds a superseded version's predictions stay in Label Studio before they are deleted, "
        "so a task opened with one can still be submitted (Label Studio's task lock lasts 24 h).",
    ),
    "TASK_RESYNC_S": (
        "600",
        "A job reads only the tasks Label Studio changed since the last job (and lists every "
        "task when the count differs: deleted tasks); every task is listed at least this often. "
        "0: every job lists every task.",
    ),
    "JOB_SETTLE_S": (
        "1.0",
        "A job waits until this many seconds passed since the project's last webhook before it "
        "reads the labels, so the webhooks of one submit make one retrain.",
    ),
    "JOB_LEASE_S": (
        "30",
        "A running job renews a lease this long; a job whose lease ran out (worker killed) is "
        "recorded as failed and its project retrains again.",
    ),
    "JOB_RETRY_S": (
        "30",
        "A job that failed because Label Studio was unreachable runs again after this many "
        "seconds (doubling per consecutive failure, at most 15 minutes).",
    ),
    "RECONCILE_S": (
        "15",
        "How often every worker looks for jobs that died or were lost and enqueues their follow-up.",
    ),
    "MIN_LABELS": ("2", "Labels needed (over at least two classes) before the first retrain."),
    "MAX_REQUEST_BYTES": ("52428800", "Largest request body accepted (bytes); larger gets 413."),
    "IMAGE_FETCH_WORKERS": ("8", "Concurrent image downloads."),
    "IMAGE_FETCH_TIMEOUT": ("30", "Seconds before one image download is abandoned."),
    "MAX_IMAGE_PIXELS": (
        "100000000",
        "Images with more pixels are refused (decompression-bomb guard).",
    ),
    "MAX_IMAGE_BYTES": (
        "67108864",
        "Largest image download (bytes); a bigger Content-Length or body is refused. Bounds the "
        "memory of IMAGE_FETCH_WORKERS concurrent downloads.",
    ),
    "IMAGE_HOSTS": (
        None,
        "Comma-separated hosts besides Label Studio that task image URLs may point at: "
        "`images.example.com`, `*.example.com` (any subdomain), `*` (any public host). "
        "Private, loopback and link-local addresses are refused unless their host is listed by "
        "name (never by `*`).",
    ),
    "JOB_TIMEOUT": ("7200", "Seconds a training job may run before RQ stops it."),
    "RQ_QUEUE": (
        "ml-backend",
        "Name of the RQ queue (several deployments may share one Redis); pretraining jobs go to "
        "`<RQ_QUEUE>-pretrain` and embedding helpers to `<RQ_QUEUE>-embed`, which every worker "
        "also serves.",
    ),
    "RUN_WORKERS": (
        "auto",
        "Worker processes `run` starts. 2: one pretrains a project's backbone while the other "
        "retrains after each label; 1: retrains and pretraining slices (PRETRAIN_SLICE_S) in "
        "turn (on a CPU two workers share the cores and the pretraining gets a third of its "
        "epochs, measured on 2 cores). auto: 2 with an NVIDIA GPU (DEVICE auto or cuda), else 1.",
    ),
}


# (lowest, highest) allowed value of numeric settings where a huge value does harm (memory,
# O(N^2) ranking, a GPU held until JOB_TIMEOUT). A value outside stops the process with a
# ConfigError naming the bound; the per-project knobs in PARAM_RULES use the same bounds.
BOUNDS: dict[str, tuple[int, int]] = {
    "IMAGE_SIZE": (32, 1024),  # or 0: auto
    "PRETRAIN_BUDGET_S": (0, 86_400),
    "PRETRAIN_EPOCHS": (1, 10_000),
    "PRETRAIN_SLICE_S": (0, 86_400),
    "FINETUNE_MIN_LABELS": (2, 10_000_000),
    "EPOCHS": (0, 200),
    "BATCH_SIZE": (1, 4096),
    "INFERENCE_BATCH_SIZE": (1, 8192),
    "EMBED_CHUNK": (0, 10_000_000),
    "QUEUE_BATCH": (1, 1000),
    "SHORTLIST_FACTOR": (1, 100),
    "KEEP_VERSIONS": (1, 100),
    "MAX_REQUEST_BYTES": (1024, 1 << 30),
    "IMAGE_FETCH_WORKERS": (1, 64),
    "RUN_WORKERS": (1, 16),  # or 0: auto
    "MAX_IMAGE_PIXELS": (1024, 178_956_970),  # Pillow refuses more than this anyway
    "MAX_IMAGE_BYTES": (1024, 1 << 30),
    "JOB_TIMEOUT": (10, 86_400),
    "QUEUE_DEPTH": (1, 100_000),
    "JOB_LEASE_S": (3, 3600),
}


def _knob_one_of(choices: tuple[str, ...]):
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip() not in choices:
            raise ValueError
        return value.strip()

    return parse, f"one of {', '.join(choices)}"


def _knob_whole(setting: str, note: str = ""):
    low, high = BOUNDS[setting]

    def parse(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value.strip()) if isinstance(value, str) else int(value)
        if not low <= number <= high:
            raise ValueError
        return number

    return parse, f"a whole number from {low} to {high}{note} (the limit of {setting})"


PROBCOVER_RADIUS_RANGE = (0.05, 2.0)  # on unit-length embeddings; "purity" is stored as 0


def _knob_radius():
    def parse(value: Any) -> float:
        if isinstance(value, str) and value.strip().lower() == "purity":
            return 0.0
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        low, high = PROBCOVER_RADIUS_RANGE
        if not low <= number <= high:
            raise ValueError
        return number

    return parse, "a number from 0.05 to 2 or purity (the limit of PROBCOVER_RADIUS)"


# Per-project knobs (the model's "Extra params" in Label Studio): name -> (parser, what is
# allowed). Each overrides the setting of the same name in upper case, within its BOUNDS.
PARAM_RULES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "strategy": _knob_one_of(STRATEGIES),
    "uncertainty": _knob_one_of(UNCERTAINTY_MEASURES),
    "queue_batch": _knob_whole("QUEUE_BATCH"),
    "shortlist_factor": _knob_whole("SHORTLIST_FACTOR"),
    "epochs": _knob_whole("EPOCHS", ", 0 = automatic"),
    "probcover_radius": _knob_radius(),
}


def _int(name: str, raw: str, minimum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw


def _image_size(raw: str) -> int:
    """IMAGE_SIZE: ``auto`` (0) or a whole number of pixels."""
    if raw.strip().lower() == "auto":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"IMAGE_SIZE must be auto or a whole number, got {raw!r}") from None
    if value < 32:
        raise ConfigError(f"IMAGE_SIZE must be auto or at least 32, got {value}")
    return value


def _probcover_radius(raw: str) -> float:
    """PROBCOVER_RADIUS: ``purity`` (0.0) or a radius in [0.05, 2]."""
    if raw.strip().lower() == "purity":
        return 0.0
    return _float("PROBCOVER_RADIUS", raw, *PROBCOVER_RADIUS_RANGE)


def _run_workers(raw: str) -> int:
    """RUN_WORKERS: ``auto`` (0) or a whole number of worker processes."""
    if raw.strip().lower() == "auto":
        return 0
    return _int("RUN_WORKERS", raw, minimum=1)


def run_worker_count(settings: Settings, gpu_present: Callable[[], bool] | None = None) -> int:
    """How many workers ``run`` starts: RUN_WORKERS, or under ``auto`` 2 when an NVIDIA GPU is
    there for them (``DEVICE`` auto or cuda), else 1. On a CPU two workers share the cores, and
    the pretraining, bounded by seconds, gets a third of its epochs (README, live model)."""
    if settings.run_workers:
        return settings.run_workers
    if settings.device == "cpu":
        return 1
    if settings.device.startswith("cuda"):
        return 2
    present = gpu_present or (lambda: any(Path("/proc/driver/nvidia/gpus").glob("*")))
    return 2 if present() else 1


def _on_off(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off; got {raw!r}")


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ConfigError(f"DEVICE must be auto, cpu, cuda or cuda:N; got {raw!r}")


def _pretrained(raw: str) -> str:
    if raw in ("imagenet", "none"):
        return raw
    if not Path(raw).is_file():
        raise ConfigError(
            f"PRETRAINED must be imagenet, none or the path of a state_dict file; {raw!r} is not a file"
        )
    return raw


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    if not raw.startswith(tuple(f"{s}://" for s in schemes)):
        raise ConfigError(
            f"{name} must start with {' or '.join(s + '://' for s in schemes)}; got {raw!r}"
        )
    return raw.rstrip("/")


_HOST_ENTRY = re.compile(
    r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]|[0-9a-f:.]+)$"
)


def _hosts(raw: str | None) -> tuple[str, ...]:
    """IMAGE_HOSTS: lower-cased entries; each a host name, ``*.domain``, ``*`` or an IP."""
    if not raw:
        return ()
    entries = tuple(e.strip().lower().rstrip(".") for e in raw.split(",") if e.strip())
    for entry in entries:
        if not _HOST_ENTRY.match(entry) or "://" in entry or "/" in entry:
            raise ConfigError(
                f"IMAGE_HOSTS entries must be host names, *.domain or *, without scheme, port "
                f"or path; got {entry!r}"
            )
    return tuple(e.strip("[]") for e in entries)  # urlsplit's hostname has no brackets


def _check_bounds(settings: Settings) -> None:
    for name, (low, high) in BOUNDS.items():
        value = getattr(settings, name.lower())
        if name in ("IMAGE_SIZE", "RUN_WORKERS") and value == 0:  # auto
            continue
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the backend. Build it with ``Settings.from_env()``; tests pass their own."""

    label_studio_url: str = "http://localhost:8080"
    label_studio_api_key: str | None = dataclasses.field(default=None, repr=False)
    redis_url: str | None = None
    model_dir: Path = Path("./data/models")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = dataclasses.field(default=None, repr=False)
    log_level: str = "INFO"
    device: str = "auto"
    pretrained: str = "imagenet"
    image_size: int = 0  # 0: auto (chosen per project from its images)
    self_supervised: bool = True
    pretrain_budget_s: int = 120
    pretrain_epochs: int = 200
    pretrain_slice_s: int = 30
    pseudo_labels: bool = True
    label_spreading: bool = True
    finetune_min_labels: int = 200
    epochs: int = 0
    batch_size: int = 64
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    inference_batch_size: int = 256
    embed_chunk: int = 10_000
    strategy: str = "auto"
    probcover_radius: float = 0.5  # 0: the purity rule
    uncertainty: str = "margin"
    queue_batch: int = 20
    shortlist_factor: int = 5
    auto_labels_per_class: float = 3.0
    auto_min_accuracy: float = 0.0
    keep_versions: int = 3
    queue_depth: int = 100
    prediction_grace: float = 86400.0
    job_settle_s: float = 1.0
    task_resync_s: float = 600.0
    job_lease_s: int = 30
    job_retry_s: float = 30.0
    reconcile_s: float = 15.0
    min_labels: int = 2
    max_request_bytes: int = 50 * 1024 * 1024
    image_fetch_workers: int = 8
    image_fetch_timeout: float = 30.0
    max_image_pixels: int = 100_000_000
    max_image_bytes: int = 64 << 20
    image_hosts: tuple[str, ...] = ()
    job_timeout: int = 7200
    rq_queue: str = "ml-backend"
    run_workers: int = 0  # 0: auto (see run_worker_count)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise ``ConfigError`` naming the bad variable."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return SETTINGS_DOC[name][0]
            return value.strip()

        user, password = get("BASIC_AUTH_USER"), get("BASIC_AUTH_PASS")
        if bool(user) != bool(password):
            raise ConfigError(
                "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or neither)"
            )
        redis_url = get("REDIS_URL")
        settings = cls(
            label_studio_url=_url("LABEL_STUDIO_URL", get("LABEL_STUDIO_URL"), ("http", "https")),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY"),
            redis_url=_url("REDIS_URL", redis_url, ("redis", "rediss", "unix"))
            if redis_url
            else None,
            model_dir=Path(get("MODEL_DIR")),
            basic_auth_user=user,
            basic_auth_pass=password,
            log_level=_choice("LOG_LEVEL", get("LOG_LEVEL").upper(), LOG_LEVELS),
            device=_device(get("DEVICE")),
            pretrained=_pretrained(get("PRETRAINED")),
            image_size=_image_size(get("IMAGE_SIZE")),
            self_supervised=_on_off("SELF_SUPERVISED", get("SELF_SUPERVISED")),
            pretrain_budget_s=_int("PRETRAIN_BUDGET_S", get("PRETRAIN_BUDGET_S"), minimum=0),
            pretrain_epochs=_int("PRETRAIN_EPOCHS", get("PRETRAIN_EPOCHS"), minimum=1),
            pretrain_slice_s=_int("PRETRAIN_SLICE_S", get("PRETRAIN_SLICE_S"), minimum=0),
            pseudo_labels=_on_off("PSEUDO_LABELS", get("PSEUDO_LABELS")),
            label_spreading=_on_off("LABEL_SPREADING", get("LABEL_SPREADING")),
            finetune_min_labels=_int("FINETUNE_MIN_LABELS", get("FINETUNE_MIN_LABELS"), minimum=2),
            epochs=_int("EPOCHS", get("EPOCHS"), minimum=0),
            batch_size=_int("BATCH_SIZE", get("BATCH_SIZE"), minimum=1),
            learning_rate=_float("LEARNING_RATE", get("LEARNING_RATE"), 1e-7, 1.0),
            val_fraction=_float("VAL_FRACTION", get("VAL_FRACTION"), 0.0, 0.5),
            seed=_int("SEED", get("SEED")),
            inference_batch_size=_int(
                "INFERENCE_BATCH_SIZE", get("INFERENCE_BATCH_SIZE"), minimum=1
            ),
            embed_chunk=_int("EMBED_CHUNK", get("EMBED_CHUNK"), minimum=0),
            strategy=_choice("STRATEGY", get("STRATEGY"), STRATEGIES),
            probcover_radius=_probcover_radius(get("PROBCOVER_RADIUS")),
            uncertainty=_choice("UNCERTAINTY", get("UNCERTAINTY"), UNCERTAINTY_MEASURES),
            queue_batch=_int("QUEUE_BATCH", get("QUEUE_BATCH"), minimum=1),
            shortlist_factor=_int("SHORTLIST_FACTOR", get("SHORTLIST_FACTOR"), minimum=1),
            auto_labels_per_class=_float(
                "AUTO_LABELS_PER_CLASS", get("AUTO_LABELS_PER_CLASS"), 0.1, 100_000
            ),
            auto_min_accuracy=_float("AUTO_MIN_ACCURACY", get("AUTO_MIN_ACCURACY"), 0.0, 1.0),
            keep_versions=_int("KEEP_VERSIONS", get("KEEP_VERSIONS"), minimum=1),
            queue_depth=_int("QUEUE_DEPTH", get("QUEUE_DEPTH"), minimum=1),
            prediction_grace=_float("PREDICTION_GRACE", get("PREDICTION_GRACE"), 0.0, 30 * 86400),
            job_settle_s=_float("JOB_SETTLE_S", get("JOB_SETTLE_S"), 0.0, 30.0),
            task_resync_s=_float("TASK_RESYNC_S", get("TASK_RESYNC_S"), 0.0, 86_400.0),
            job_lease_s=_int("JOB_LEASE_S", get("JOB_LEASE_S"), minimum=3),
            job_retry_s=_float("JOB_RETRY_S", get("JOB_RETRY_S"), 1.0, 3600.0),
            reconcile_s=_float("RECONCILE_S", get("RECONCILE_S"), 1.0, 3600.0),
            min_labels=_int("MIN_LABELS", get("MIN_LABELS"), minimum=2),
            max_request_bytes=_int("MAX_REQUEST_BYTES", get("MAX_REQUEST_BYTES"), minimum=1024),
            image_fetch_workers=_int("IMAGE_FETCH_WORKERS", get("IMAGE_FETCH_WORKERS"), minimum=1),
            image_fetch_timeout=_float(
                "IMAGE_FETCH_TIMEOUT", get("IMAGE_FETCH_TIMEOUT"), 0.1, 3600
            ),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", get("MAX_IMAGE_PIXELS"), minimum=1024),
            max_image_bytes=_int("MAX_IMAGE_BYTES", get("MAX_IMAGE_BYTES"), minimum=1024),
            image_hosts=_hosts(get("IMAGE_HOSTS")),
            job_timeout=_int("JOB_TIMEOUT", get("JOB_TIMEOUT"), minimum=10),
            rq_queue=get("RQ_QUEUE"),
            run_workers=_run_workers(get("RUN_WORKERS")),
        )
        _check_bounds(settings)
        return settings

    def with_overrides(self, **changes) -> Settings:
        """A copy with some fields changed (per-project knobs, tests)."""
        return dataclasses.replace(self, **changes)


def child_environment(**overrides: str | None) -> dict[str, str]:
    """This process's environment with ``overrides`` applied (``None`` removes a variable).

    For the processes ``python -m ml_backend run`` starts: they read their settings from it.
    """
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def settings_markdown() -> str:
    """The settings table for the README, generated from ``SETTINGS_DOC`` so it stays true."""
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for name, (default, text) in SETTINGS_DOC.items():
        shown = f"`{default}`" if default is not None else "(unset)"
        if name in BOUNDS:
            text += " Allowed: {} to {}.".format(*BOUNDS[name])
        rows.append(f"| `{name}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
