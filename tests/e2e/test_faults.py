"""Faults with the real parts: Redis restarted mid-job, Label Studio stopped during a job.

Each runs the backend as users do (``serve`` + ``worker``) against a real Label Studio 1.23.2,
breaks one part while a job runs (during the self-supervised pretraining job, the longest one),
and checks that nothing is lost: nothing is switched by a failed job, and a version trained on
every label, on the new backbone, goes live without anyone doing anything. (A
worker killed with SIGKILL mid-job is in ``tests/jobs/test_worker.py``; Label Studio capping its
page size and a renamed ``<Choices>`` in ``tests/labelstudio/test_live_faults.py``.)
"""

from __future__ import annotations

import time

import pytest
from e2e_support import backend_env, new_project, running_stack, spread_labels, wait_for
from faulty_proxy import FaultyProxy

from ml_backend.devtools.demo_project import LabelStudioAPI
from ml_backend.devtools.local_services import LabelStudioServer, RedisProcess, tail

pytestmark = pytest.mark.e2e

FAST = {
    "IMAGE_SIZE": "32",
    "BATCH_SIZE": "8",
    "QUEUE_BATCH": "5",
    "JOB_LEASE_S": "6",
    "RECONCILE_S": "2",
    "JOB_RETRY_S": "5",
    "PRETRAIN_BUDGET_S": "5",
}
# The pretraining runs for its whole budget (not stopped by PRETRAIN_EPOCHS), in three slices:
# long enough to break something in the middle, or between two slices.
LONG_PRETRAINING = {"PRETRAIN_BUDGET_S": "25", "PRETRAIN_EPOCHS": "10000", "PRETRAIN_SLICE_S": "10"}


def wait_for_pretraining(stack, project: int, timeout_s: float = 120) -> None:
    def check():
        pretraining = (stack.status(project) or {}).get("pretraining") or {}
        return pretraining.get("state") == "running" and pretraining["progress"].get("epoch")

    wait_for(check, "the pretraining job to run its first epoch", timeout_s, stack.logs)


def test_redis_restarted_mid_job_loses_nothing(label_studio, ls_api, e2e_dir):
    redis = RedisProcess(e2e_dir / "redis-restarted").start()
    env = backend_env(label_studio, redis.url, e2e_dir / "models-redis", label_studio.token)
    env.update(FAST, **LONG_PRETRAINING)
    try:
        with running_stack(label_studio, ls_api, env, e2e_dir / "logs-redis", "backend") as stack:
            project, truth = new_project(stack, "redis restart", n=60, uploads=0)
            wait_for_pretraining(stack, project)  # after the cold start, which read the labels
            labeled = spread_labels(truth, 9)
            for task, label in labeled:  # labels the running job did not see: a follow-up is due
                stack.api.annotate(task, label)
            redis.stop()  # all queue state, markers (that follow-up too) and status are gone
            redis.start()
            extra = next(t for t in sorted(truth) if t not in dict(labeled))
            stack.api.annotate(extra, truth[extra])  # a label right after the restart
            final = stack.wait_idle_version(
                project, "the version trained on every label", set(), labels=10
            )
            assert stack.api.project(project)["model_version"] == final["model_version"]
            assert final["pretraining"]["state"] == "done", final["pretraining"]
            jobs = stack.finished_jobs(project)
            served = next(j for j in jobs if j["model_version"] == final["model_version"])[
                "metrics"
            ]
            assert served["backbone"] == final["pretraining"]["backbone"] == "b1", served
            assert final["pretraining"]["seconds"] >= 25  # the budget, over every slice
            # Later slices went on from a checkpoint, across the restart too.
            assert "going on after" in stack.backend.log_path("worker").read_text()
            assert stack.backend.alive(), "the worker and web app survive a Redis restart"
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def stoppable_ls(e2e_dir, missing_real_part):
    """A Label Studio of this module's own: the test stops and restarts it."""
    server = LabelStudioServer(e2e_dir / "label-studio-stoppable")
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"Label Studio did not start: {exc}\n{tail(server.log_path)}")
    yield server
    server.stop()


def test_label_studio_down_during_a_job_retries_when_it_is_back(stoppable_ls, e2e_dir):
    ls = stoppable_ls
    api = LabelStudioAPI(ls.url, ls.token)
    redis = RedisProcess(e2e_dir / "redis-ls-down").start()
    env = backend_env(ls, redis.url, e2e_dir / "models-ls-down", ls.token)
    env.update(FAST, **LONG_PRETRAINING)
    try:
        with running_stack(ls, api, env, e2e_dir / "logs-ls-down", "backend") as stack:
            project, _ = new_project(stack, "label studio down", n=60, uploads=0)
            cold = wait_for(  # the cold start goes live before the pretraining ends
                lambda: (stack.status(project) or {}).get("model_version", "") or None,
                "the cold start", 120, stack.logs,
            )  # fmt: skip
            cold = {"model_version": cold}
            wait_for_pretraining(stack, project)
            ls.stop()  # the job on the new backbone, asked for next, finds no Label Studio

            def failed():
                last = (stack.status(project) or {}).get("last_job") or {}
                return last.get("outcome") == "failed" and last

            last = wait_for(failed, "the job to give up on Label Studio", 120, stack.logs)
            assert "LabelStudioUnavailable" in last["error"] and "retrying in" in last["error"]
            assert last["reason"] == "backbone ready", last
            assert (stack.status(project) or {}).get("model_version") == cold["model_version"]
            time.sleep(3)
            ls.start()
            shown = api.project(project)["model_version"]
            assert shown == cold["model_version"], "a failed job switched it"
            final = stack.wait_idle_version(
                project,
                "the retry once Label Studio is back",
                {cold["model_version"]},
                labels=0,
                allow_failures=True,
            )
            assert api.project(project)["model_version"] == final["model_version"]
            reasons = [j["reason"] for j in stack.finished_jobs(project, allow_failures=True)]
            assert "retry" in reasons, reasons
    finally:
        redis.stop()


def test_a_failing_queue_view_after_the_switch_keeps_the_new_version(label_studio, ls_api, e2e_dir):
    def views(method: str, path: str) -> int | None:  # only the Data Manager views API fails
        return 500 if path.startswith("/api/dm/views") else None

    redis = RedisProcess(e2e_dir / "redis-views").start()
    models = e2e_dir / "models-views"
    try:
        with FaultyProxy(label_studio.url, views) as proxy:
            env = backend_env(label_studio, redis.url, models, label_studio.token)
            env.update(FAST, EPOCHS="5", LABEL_STUDIO_URL=proxy.url)
            with running_stack(
                label_studio, ls_api, env, e2e_dir / "logs-views", "backend"
            ) as stack:
                project, truth = new_project(stack, "failing view", n=60, uploads=0)
                cold = stack.wait_idle_version(project, "the cold start", newer_than=set())
                for task, label in spread_labels(truth, 9):
                    ls_api.annotate(task, label)
                trained = stack.wait_idle_version(
                    project, "the retrain", {cold["model_version"]}, labels=9
                )
                version = trained["model_version"]
                assert ls_api.project(project)["model_version"] == version
                (job,) = [j for j in stack.finished_jobs(project) if j["model_version"] == version]
                warnings = job["metrics"]["publish_warnings"]
                assert any(w.startswith("queue view: LabelStudioUnavailable") for w in warnings)
                assert (models / str(project) / version / "weights.pt").is_file()
                assert proxy.failed, "the fault was injected"
    finally:
        redis.stop()
