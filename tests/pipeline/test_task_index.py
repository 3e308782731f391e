"""The task index: a job reads only what Label Studio changed, and lists everything when needed."""

import datetime as dt
import json
import sqlite3

import pytest

from ml_backend.pipeline.task_index import OVERLAP_S, TaskIndex

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def stamp(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


class FakeLabelStudio:
    """Tasks with Label Studio's ``updated_at``; ``iter_tasks`` filters as its query does."""

    def __init__(self, n: int):
        self.tasks = {i: {"id": i, "data": {"image": f"/{i}.png"}, "annotations": [],
                          "updated_at": stamp(i)} for i in range(1, n + 1)}  # fmt: skip
        self.listings = []

    def iter_tasks(self, pid, updated_after=None):
        self.listings.append(updated_after)
        after = None if updated_after is None else dt.datetime.fromisoformat(updated_after)
        for task in self.tasks.values():
            when = task.get("updated_at")
            if after is None or dt.datetime.fromisoformat(when.replace("Z", "+00:00")) > after:
                yield dict(task)

    def project(self, pid, fields=None):
        return {"id": pid, "task_number": len(self.tasks)}

    def touch(self, task_id: int, seconds: float, **fields) -> None:
        self.tasks[task_id] = {**self.tasks[task_id], **fields, "updated_at": stamp(seconds)}


@pytest.fixture
def index(tmp_path):
    return TaskIndex(tmp_path, 7)


def test_after_a_full_listing_only_changed_and_new_tasks_are_read(index):
    ls = FakeLabelStudio(50)
    tasks, info = index.read(ls, 7, resync_s=600)
    assert info == {"listing": "full", "read": 50, "why": "no index yet"} and len(tasks) == 50
    # A label on task 3, a new task 51: only tasks updated after the newest one seen (task 50 at
    # +50 s), less the overlap, are read.
    ls.touch(3, 100, annotations=[{"id": 1, "result": "Sunny"}])
    ls.tasks[51] = {"id": 51, "data": {"image": "/51.png"}, "annotations": [],
                    "updated_at": stamp(101)}  # fmt: skip
    tasks, info = index.read(ls, 7, resync_s=600)
    assert info["listing"] == "changed" and info["read"] == 2 + int(OVERLAP_S)
    assert ls.listings[-1] == "2026-12-01T12:00:45.000000Z"  # Label Studio's own format
    assert [t["id"] for t in tasks] == list(range(1, 52))
    assert tasks[2]["annotations"] == [{"id": 1, "result": "Sunny"}]
    # Nothing changed: what is in the overlap is all that is read again (tasks 3 and 51).
    assert index.read(ls, 7, resync_s=600)[1]["read"] == 2


def test_a_deleted_task_makes_the_next_job_list_everything(index):
    ls = FakeLabelStudio(20)
    index.read(ls, 7, resync_s=600)
    del ls.tasks[4]
    tasks, info = index.read(ls, 7, resync_s=600)
    assert info["listing"] == "full" and "the index has 20 tasks, Label Studio 19" in info["why"]
    assert 4 not in [t["id"] for t in tasks]


def test_full_listings_on_refresh_on_schedule_and_when_turned_off(index):
    ls = FakeLabelStudio(10)
    index.read(ls, 7, resync_s=600)
    assert index.read(ls, 7, resync_s=600, full=True)[1]["why"] == "refresh"
    assert index.read(ls, 7, resync_s=0)[1]["why"] == "TASK_RESYNC_S=0"
    with sqlite3.connect(index.path) as db:  # the last full listing, 601 s earlier
        db.execute("UPDATE state SET value = value - 601 WHERE key = 'full_at'")
    info = index.read(ls, 7, resync_s=600)[1]
    assert info["listing"] == "full" and "TASK_RESYNC_S=600" in info["why"]
    assert index.read(ls, 7, resync_s=600)[1]["listing"] == "changed"


def test_a_damaged_index_or_tasks_without_updated_at_mean_a_full_listing(index):
    ls = FakeLabelStudio(10)
    index.read(ls, 7, resync_s=600)
    index.path.write_text("{not json")
    assert index.read(ls, 7, resync_s=600)[1] == {"listing": "full", "read": 10,
                                                   "why": "no index yet"}  # fmt: skip
    for task in ls.tasks.values():  # a Label Studio that does not send updated_at
        task.pop("updated_at")
    index.read(ls, 7, resync_s=600, full=True)
    info = index.read(ls, 7, resync_s=600)[1]
    assert info["listing"] == "full" and info["why"] == "the tasks carry no updated_at"


def test_tasks_label_studio_counts_but_does_not_list_cause_no_endless_full_listings(index):
    ls = FakeLabelStudio(10)
    counted = ls.project
    ls.project = lambda pid, fields=None: {**counted(pid), "task_number": 12}  # two it never lists
    assert index.read(ls, 7, resync_s=600)[1]["listing"] == "full"
    assert index.read(ls, 7, resync_s=600)[1]["listing"] == "changed"
    ls.project = lambda pid, fields=None: {
        **counted(pid),
        "task_number": 11,
    }  # one of them was deleted
    assert index.read(ls, 7, resync_s=600)[1]["listing"] == "full"


def test_a_reason_for_a_full_listing_is_reported(index):
    ls = FakeLabelStudio(5)
    index.read(ls, 7, resync_s=600)
    info = index.read(ls, 7, resync_s=600, full="annotations were deleted")[1]
    assert info == {"listing": "full", "read": 5, "why": "annotations were deleted"}


def test_a_job_writes_only_the_rows_that_changed(index, monkeypatch):
    from ml_backend.pipeline import task_index

    ls = FakeLabelStudio(1000)
    index.read(ls, 7, resync_s=600)
    written = []
    rows = task_index._rows
    monkeypatch.setattr(task_index, "_rows", lambda tasks: (written.append(r) or r
                                                            for r in rows(tasks)))  # fmt: skip
    ls.touch(10, 2000, annotations=[{"id": 1, "result": "Rainy"}])
    tasks, info = index.read(ls, 7, resync_s=600)
    # task 10, and the overlap: the tasks of the OVERLAP_S seconds before the newest seen
    assert info["listing"] == "changed" and [r[0] for r in written] == [10, *range(996, 1001)]
    assert len(tasks) == 1000 and tasks[9]["annotations"] == [{"id": 1, "result": "Rainy"}]
    with sqlite3.connect(index.path) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (1000,)


def test_a_listing_that_fails_half_way_leaves_the_index_as_it_was(index):
    ls = FakeLabelStudio(30)
    index.read(ls, 7, resync_s=600)
    ls.touch(5, 100, annotations=[{"id": 1, "result": "Sunny"}])
    listed = ls.iter_tasks

    def broken(pid, updated_after=None):
        yield from listed(pid, updated_after)
        raise ConnectionError("Label Studio went away")

    ls.iter_tasks = broken
    with pytest.raises(ConnectionError):
        index.read(ls, 7, resync_s=600)
    with pytest.raises(ConnectionError):
        index.read(ls, 7, resync_s=600, full=True)
    assert index.load()["tasks"][4]["annotations"] == []  # nothing half-written
    ls.iter_tasks = listed
    tasks, info = index.read(ls, 7, resync_s=600)
    assert info["listing"] == "changed" and tasks[4]["annotations"][0]["result"] == "Sunny"


def test_the_index_of_the_previous_format_is_replaced(index, tmp_path):
    legacy = index.path.parent / "tasks.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"format": 1, "tasks": []}))
    assert index.read(FakeLabelStudio(3), 7, resync_s=600)[1]["why"] == "no index yet"
    assert not legacy.exists() and index.path.exists()


def test_a_worker_applies_changes_to_the_tasks_it_holds_and_rereads_after_other_writers(
    index, tmp_path, monkeypatch
):
    """After a job, the next one in the same process parses only the rows it read (not the
    whole index), and gets what a fresh read of the file gives; a write by anyone else (another
    process's job, here a second ``TaskIndex``) or a full listing makes it read the file again."""
    ls = FakeLabelStudio(40)
    index.read(ls, 7, resync_s=600)
    reads = []
    whole = TaskIndex._tasks
    monkeypatch.setattr(TaskIndex, "_tasks", staticmethod(lambda db: reads.append(1) or whole(db)))

    def fresh():
        with sqlite3.connect(index.path) as db:
            return whole(db)

    index.read(ls, 7, resync_s=600)  # the first after the full listing reads the file
    assert len(reads) == 1
    ls.touch(3, 100, annotations=[{"id": 1, "result": "Sunny"}])
    ls.tasks[41] = {"id": 41, "data": {"image": "/41.png"}, "annotations": [],
                    "updated_at": stamp(101)}  # fmt: skip
    tasks, _ = index.read(ls, 7, resync_s=600)
    assert len(reads) == 1 and tasks == fresh() and tasks[2]["annotations"][0]["result"] == "Sunny"
    tasks[0] = None  # the caller's list: the memo is not changed through it
    assert index.read(ls, 7, resync_s=600)[0] == fresh() and len(reads) == 1

    other = TaskIndex(tmp_path, 7)  # "another worker": same file, its own memo entry is ours
    from ml_backend.pipeline import task_index

    monkeypatch.setattr(task_index, "_memo", {})  # ... so give it an empty one of its own
    ls.touch(5, 200, annotations=[{"id": 2, "result": "Rainy"}])
    other.read(ls, 7, resync_s=600)
    monkeypatch.undo()
    monkeypatch.setattr(TaskIndex, "_tasks", staticmethod(lambda db: reads.append(1) or whole(db)))
    reads.clear()
    tasks, _ = index.read(ls, 7, resync_s=600)
    assert len(reads) == 1 and tasks[4]["annotations"][0]["result"] == "Rainy"
    index.read(ls, 7, resync_s=600, full=True)
    index.read(ls, 7, resync_s=600)
    assert len(reads) == 2
