"""The app's plain parts: the job manager (events through a cursor, cancel, one-line failures,
sessions apart, queues in order with their positions, listeners), the workspace's downloads,
and launch.py's flags."""

from __future__ import annotations

import threading
import time
import zipfile

import pytest

from mergecore.errors import MergeError
from mergecore.events import Event


def _wait(job, timeout=10.0):
    assert job.wait(timeout), f"job {job.id} did not finish: {job.status}"


def test_search_like_job_streams_events_through_the_cursor():
    from app.jobs import DONE, JobManager
    from app.plots import events_frame

    jobs = JobManager()
    gate = threading.Event()

    def fake_search(ctx):
        best = 0.0
        for step in range(6):
            ctx.check()
            reward = 0.1 * step
            best = max(best, reward)
            ctx.emit(Event("search.step", {"step": step, "reward": reward, "best": best}))
            ctx.log(f"step {step}: reward {reward:.2f}")
            if step == 2:
                gate.wait(5)
        return {"best": best}

    job = jobs.submit("alice", "search", fake_search, title="fake search")
    deadline = time.time() + 5
    snap = jobs.snapshot("alice", job.id)
    while len(snap["events"]) < 3 and time.time() < deadline:
        time.sleep(0.01)
        snap = jobs.snapshot("alice", job.id)
    assert snap["status"] == "running" and [e["data"]["step"] for e in snap["events"]] == [0, 1, 2]
    cursor = snap["cursor"]
    gate.set()
    _wait(job)
    rest = jobs.snapshot("alice", job.id, since=cursor)
    assert [e["data"]["step"] for e in rest["events"]] == [3, 4, 5]  # only what is new
    assert rest["status"] == DONE and job.result == {"best": pytest.approx(0.5)}
    assert rest["log"][-1].endswith("step 5: reward 0.50")
    frame = events_frame(snap["events"] + rest["events"], "search.step", "step", ["reward", "best"])
    assert len(frame) == 12 and set(frame["series"]) == {"reward", "best"}


def test_jobs_cancel_fail_and_keep_working():
    from app.jobs import CANCELLED, DONE, FAILED, JobManager

    jobs = JobManager()

    def slow(ctx):
        while True:
            ctx.check()
            time.sleep(0.01)

    job = jobs.submit("bob", "merge", slow)
    with pytest.raises(MergeError, match="already running"):
        jobs.submit("bob", "merge", slow)  # one merge at a time per session
    jobs.cancel("bob", job.id)
    _wait(job)
    assert job.status == CANCELLED

    def bad_input(ctx):
        raise MergeError("tensor 'x' has shape [2]\n  but [3] elsewhere")

    def crash(ctx):
        raise ValueError("something\nbroke")

    j1 = jobs.submit("bob", "merge", bad_input)
    _wait(j1)
    j2 = jobs.submit("bob", "merge", crash)
    _wait(j2)
    assert (j1.status, j1.error) == (FAILED, "tensor 'x' has shape [2] but [3] elsewhere")
    assert (j2.status, j2.error) == (FAILED, "ValueError: something broke")
    j3 = jobs.submit("bob", "merge", lambda ctx: 42)
    _wait(j3)
    assert (j3.status, j3.result) == (DONE, 42)


def test_queued_jobs_run_in_order_with_their_positions_and_listeners_hear_them():
    from app.jobs import CANCELLED, DONE, JobManager

    jobs = JobManager(max_queued=3)
    heard: list[tuple[str, str, str]] = []
    jobs.listeners.append(lambda event, job: heard.append((event, job.title, job.status)))
    jobs.listeners.append(lambda event, job: 1 / 0)  # a failing listener breaks nothing
    gate, order = threading.Event(), []

    def work(name):
        def fn(ctx):
            while not gate.wait(0.01):
                ctx.check()
            order.append(name)
            return name

        return fn

    a, b, c = (jobs.submit("alice", "merge", work(n), title=n, queue="merge:alice", exclusive=False) for n in "abc")
    other = jobs.submit("bob", "merge", work("o"), title="o", queue="merge:bob", exclusive=False)
    with pytest.raises(MergeError, match="already queued"):
        jobs.submit("alice", "merge", work("d"), queue="merge:alice", exclusive=False)
    assert [jobs.position(j) for j in (a, b, c, other)] == [0, 1, 2, 0]
    assert jobs.snapshot("alice", c.id)["position"] == 2
    jobs.cancel("alice", b.id)  # a queued job can be cancelled before it starts
    _wait(b)
    assert b.status == CANCELLED and jobs.position(c) == 1
    gate.set()
    for j in (a, c, other):
        _wait(j)
    assert [j.status for j in (a, c)] == [DONE, DONE] and order.index("a") < order.index("c")
    assert c.started >= a.finished  # one after the other
    assert ("submit", "a", "queued") in heard and ("finish", "a", DONE) in heard and ("finish", "b", CANCELLED) in heard


def test_jobs_are_private_to_their_session():
    from app.jobs import JobManager, JobNotFound

    jobs = JobManager()
    job = jobs.submit("alice", "merge", lambda ctx: "secret")
    _wait(job)
    with pytest.raises(JobNotFound):
        jobs.snapshot("mallory", job.id)
    with pytest.raises(JobNotFound):
        jobs.cancel("mallory", job.id)
    assert jobs.jobs("mallory") == [] and [j.id for j in jobs.jobs("alice")] == [job.id]


def test_workspace_zips_only_small_checkpoints(tmp_path, model_factory):
    import gradio as gr  # noqa: F401

    from app.files import Workspace

    ws = Workspace(tmp_path / "work", zip_limit=10_000_000)
    ckpt = model_factory("llama", 0)
    z = ws.zip_checkpoint(ckpt, "tiny")
    assert z is not None and ws.owns(z) and z.parent.parent == ws.exports
    with zipfile.ZipFile(z) as zf:
        assert "tiny/config.json" in zf.namelist()
    assert Workspace(tmp_path / "w2", zip_limit=1000).zip_checkpoint(ckpt) is None
    a = ws.merge_dir("s1", "my merge!")
    a.mkdir()
    assert ws.merge_dir("s1", "my merge!").name == "my-merge-2" and a.name == "my-merge"
    assert ws.merge_dir("s1", "my merge!", reserved={"my-merge-2"}).name == "my-merge-3"  # queued, not written yet
    assert ws.session_dir("s1") != ws.session_dir("s2")


def test_launch_flags():
    import launch

    with pytest.raises(SystemExit) as e:
        launch.main(["--help"])
    assert e.value.code == 0
