"""The backend with a personal access token (what Label Studio 1.23 hands out by default).

A PAT is a JWT refresh token made with ``POST /api/token/``; the backend must exchange it for
access tokens itself. A second backend (own web + worker, same Label Studio and Redis) runs with
the PAT and carries a small project from cold start to a retrain.
"""

from __future__ import annotations

import pytest
from e2e_support import backend_env, new_project, running_stack, spread_labels

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pat_stack(label_studio, ls_api, e2e_redis, e2e_dir):
    reply = ls_api.session.post(f"{ls_api.url}/api/token/", timeout=30)
    if reply.status_code == 409:  # only on a reused server (E2E_LABEL_STUDIO): one PAT per user
        pytest.skip("the admin already has a personal access token on this reused Label Studio")
    assert reply.status_code in (200, 201), reply.text[:300]
    token = reply.json()["token"]
    assert token.count(".") == 2, "a PAT is a JWT"
    env = backend_env(label_studio, e2e_redis.url, e2e_dir / "models-pat", token)
    env["RQ_QUEUE"] = "ml-backend-pat"  # its own worker picks its own jobs
    with running_stack(
        label_studio, ls_api, env, e2e_dir / "backend-pat-logs", "the PAT backend"
    ) as stack:
        yield stack


def test_a_personal_access_token_drives_the_whole_loop(pat_stack):
    project, truth = new_project(pat_stack, "e2e weather (PAT)", n=60, uploads=6)
    cold = pat_stack.wait_idle_version(project, "the cold-start job (PAT)", newer_than=set())
    assert cold["model_version"].startswith("coldstart-")
    assert pat_stack.api.model_versions(project).get(cold["model_version"]) == 60  # < QUEUE_DEPTH

    labeled = spread_labels(truth, 9)
    for task, label in labeled:
        pat_stack.api.annotate(task, label)
    trained = pat_stack.wait_idle_version(
        project, "the retrain (PAT)", {cold["model_version"]}, labels=len(labeled)
    )
    assert pat_stack.api.project(project)["model_version"] == trained["model_version"]
    # One prediction per unlabeled task; the cold-start ones stay (PREDICTION_GRACE): the order
    # on the PRETRAINED weights, then the one on the project's own backbone once pretrained.
    versions = pat_stack.api.model_versions(project)
    assert versions.pop(trained["model_version"]) == 60 - len(labeled)
    assert cold["model_version"] in versions and len(versions) <= 2, versions
    assert all(v.startswith("coldstart-") and n == 60 for v, n in versions.items()), versions
