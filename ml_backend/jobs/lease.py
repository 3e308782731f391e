"""Leases for running jobs, and the reconciler that turns dead jobs into recorded failures.

A running job's heartbeat thread renews its lease every third of ``JOB_LEASE_S``. A worker that
is killed (SIGKILL, out of memory, machine lost) stops renewing, so its job's lease runs out and
the job counts as gone; nothing depends on RQ's worker keys, which outlive a killed worker by
``JOB_TIMEOUT + 60`` s. Every worker runs a :class:`Reconciler` thread: at start and every
``RECONCILE_S`` it looks at each known project and, in one script per project (so many workers
never double up), clears a running job whose lease ran out or a waiting job RQ never got,
records it as failed in ``/status`` and the log, and enqueues the follow-up. A killed job's
project therefore retrains within about ``JOB_LEASE_S + RECONCILE_S`` without any new webhook.
It also runs a project again when its last job failed because Label Studio was unreachable, once
the retry delay (``JOB_RETRY_S``, doubling per failure, at most 15 minutes) has passed, and does
the same for the project's pretraining job (``jobs.pretraining.reconcile``).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews one job's lease from a daemon thread until :meth:`stop`.

    Args:
        markers: the project markers (``ml_backend.jobs.markers.Markers``).
        project_id, job_id, queue: the job.
        lease_s: the lease length; renewed every ``lease_s / 3``.
    """

    def __init__(self, markers, project_id: int, job_id: str, queue: str, lease_s: int):
        self.markers, self.project_id, self.job_id, self.queue = markers, project_id, job_id, queue
        self.lease_s = lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        lost_logged = False
        while not self._stop.wait(self.lease_s / 3):
            try:
                state = self.markers.heartbeat(
                    self.project_id, self.job_id, self.queue, self.lease_s
                )
            except Exception as exc:  # Redis down: keep trying; the lease may lapse meanwhile
                log.warning("job %s: lease not renewed (%s)", self.job_id, type(exc).__name__)
                continue
            if state == "lost" and not lost_logged:
                lost_logged = True
                log.warning(
                    "project %s: job %s lost its lease to another job of the project",
                    self.project_id,
                    self.job_id,
                )


class Reconciler:
    """Finds dead and lost jobs of one RQ queue and enqueues their follow-ups.

    Args:
        redis: a Redis connection.
        settings: the worker's settings (queue name, ``reconcile_s``).
    """

    def __init__(self, redis, settings):
        self.redis, self.settings = redis, settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[dict]:
        """One pass over every known project; returns what it did (for tests and the log)."""
        from ml_backend.jobs import pretraining
        from ml_backend.jobs.markers import Markers, job_of
        from ml_backend.jobs.queue import KILLED, LOST, enqueue, new_job_id, record_dead_job
        from ml_backend.jobs.state import StatusStore

        markers, done = Markers(self.redis), []
        for project in StatusStore(self.redis).projects():
            follow_id = new_job_id(project)
            outcome, dead, lost = markers.reconcile(project, self.settings.rq_queue, follow_id)
            if dead:
                record_dead_job(self.redis, project, job_of(dead), KILLED)
            if lost:
                record_dead_job(self.redis, project, job_of(lost), LOST)
            if outcome == "requeue":
                target = _target_of(self.redis, job_of(dead)) if dead else None
                enqueue(self.redis, self.settings, project, "recovery", follow_id, target)
                log.info("project %s: recovery job %s enqueued", project, follow_id)
                done.append({"project": project, "dead": job_of(dead), "lost": job_of(lost)})
            elif outcome == "retry":
                enqueue(self.redis, self.settings, project, "retry", follow_id)
                log.info("project %s: retry job %s enqueued", project, follow_id)
                done.append({"project": project, "retry": follow_id})
            if pretrain := pretraining.reconcile(self.redis, self.settings, project):
                done.append({"project": project, "pretraining": pretrain})
        return done

    def start(self) -> Reconciler:
        """Run :meth:`run_once` now and then every ``reconcile_s`` in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception as exc:  # Redis down or a bad key: try again next round
                log.warning("reconciler: %s: %s", type(exc).__name__, exc)
            if self._stop.wait(self.settings.reconcile_s):
                return


def _target_of(redis, job_id: str):
    """The target the dead job ran (its follow-up runs the same), or None (the training job)."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        args = Job.fetch(job_id, connection=redis).args
    except (NoSuchJobError, ValueError, TypeError):
        return None
    return args[2] if len(args) > 2 else None
