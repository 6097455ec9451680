"""Background runs: FIFO queue, cancel within a step, isolated failures, a registry that survives a
restart (and resume from its checkpoint), and records that readers never see half-written."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import toast_core.runs as runs
from toast_core.methods import build_method
from toast_core.methods.fort import FortMixin
from toast_core.runs import RunConfig, RunError, RunManager, devices, execute, listener, owners, parse_task
from toast_core.runs.execute import Executor
from toast_core.training.train import TrainConfig, cls_attention_grid, evaluate, lr_at, train

WAIT_S = 60.0


def cfg(**overrides) -> RunConfig:
    """A tiny run: 8 star classes × 1 image at 32 px (the fixture backbone's size), 4 steps."""
    base = dict(
        method="linear",
        task="stars",
        per_class=1,
        val_per_class=1,
        train=dict(steps=4, batch_size=4, lr=1e-2),
        snapshot_every=2,
        checkpoint_every=0,
    )
    base.update(overrides)
    return RunConfig(**base)


@pytest.fixture
def manager(tmp_path, fixture_backbone):
    mgr = RunManager(tmp_path / "runs", fixture_backbone, cpu_threads=1)
    yield mgr
    mgr.shutdown(timeout=WAIT_S)


def _wait_for_step(mgr: RunManager, run_id: str, step: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while mgr.status(run_id, history=False).step < step:
        assert mgr.status(run_id, history=False).state in ("queued", "running"), mgr.status(run_id).error
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.005)


def _disk(mgr: RunManager, run_id: str) -> tuple[dict, list]:
    folder = mgr.run_dir(run_id)
    return json.loads((folder / "status.json").read_text()), json.loads((folder / "history.json").read_text())


# --- configuration --------------------------------------------------------------------------------
def test_config_is_checked_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="Unknown steering method 'nope'.*Known methods: linear"):
        cfg(method="nope")
    with pytest.raises(ValueError, match="Unknown setting.*rank_typo"):
        cfg(method="lora", method_config={"rank_typo": 3})
    with pytest.raises(ValueError, match="Unknown task 'moons'.*stars"):
        cfg(task="moons")
    with pytest.raises(ValueError, match="Unknown training setting.*stepz"):
        cfg(train={"stepz": 3})
    with pytest.raises(ValueError, match="'device'.*on the RunConfig"):
        cfg(train={"device": "cpu"})
    with pytest.raises(ValueError, match="on the RunConfig"):
        cfg(train=TrainConfig(steps=3, seed=5))
    with pytest.raises(ValueError, match="lr must be > 0"):
        cfg(train={"lr": 0.0})
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        cfg(per_class=0)
    with pytest.raises(ValueError, match="device must be one of"):
        cfg(device="tpu")
    with pytest.raises(ValueError, match="episode:<n_way>"):
        cfg(task="episode:5:stars")
    ref = parse_task("episode:3:2:4:7:folder:/data/a:b")
    assert (ref.kind, ref.path, ref.n_way, ref.k_shot, ref.n_query, ref.index) == (
        "episode",
        "/data/a:b",
        3,
        2,
        4,
        7,
    )
    assert parse_task("folder:some/dir").path == "some/dir"
    round_trip = RunConfig.from_dict(json.loads(json.dumps(cfg(seed=3).to_dict())))
    assert round_trip.to_dict() == cfg(seed=3).to_dict()
    assert round_trip.train_config.steps == 4


def test_submit_refuses_what_cannot_run_here(manager, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        manager.submit(cfg(task=f"folder:{tmp_path / 'missing'}"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            manager.submit(cfg(device="cuda"))
    with pytest.raises(RunError, match="without a backbone"):
        RunManager(tmp_path / "other").submit(cfg())


def test_resumed_schedule_continues_the_learning_rate():
    base = TrainConfig(steps=20, lr=0.1, warmup_steps=3, min_lr=0.1)
    for offset in (2, 8, 19):
        rest = execute._resume_train_config(base, offset)
        assert rest.steps == 20 - offset
        assert lr_at(0, rest) == pytest.approx(lr_at(offset, base), rel=1e-6)
        assert lr_at(rest.steps - 1, rest) == pytest.approx(lr_at(19, base), rel=1e-6)


# --- the queue ------------------------------------------------------------------------------------
def test_three_runs_complete_in_queue_order(manager):
    ids = [manager.submit(cfg(method=m)) for m in ("linear", "bitfit", "lora")]
    finals = [manager.wait(i, WAIT_S) for i in ids]
    assert [s.state for s in finals] == ["done"] * 3, [s.error for s in finals]
    for before, after in zip(finals, finals[1:]):
        assert before.ended <= after.started  # one CPU worker: strictly one after another, FIFO
    assert [s.run_id for s in manager.list()] == ids
    for s in finals:
        assert s.step == s.total == 4 and len(s.history) == 4
        assert [h["step"] for h in s.history] == [1, 2, 3, 4]
        assert "val_acc" in s.history[-1] and s.final["val_acc"] == s.history[-1]["val_acc"]
        assert s.device == "cpu" and s.threads == 1 and s.peak_mb is not None
        assert s.snapshot.shape == (4, 4) and s.snapshot_step == 4  # steps 0, 2, 4 snapshotted
        assert s.epoch == pytest.approx(4 * 4 / 8)
        status, history = _disk(manager, s.run_id)
        assert status["state"] == "done" and history == s.history
        loaded = np.load(manager.run_dir(s.run_id) / "snapshot.npy", allow_pickle=False)
        np.testing.assert_array_equal(loaded, s.snapshot)
        assert (manager.run_dir(s.run_id) / "module.safetensors").is_file()
    module = manager.load_run_module(ids[2])
    assert module.name == "lora" and module.num_classes == 8


def test_cancel_stops_within_one_step_and_leaves_a_consistent_record(manager):
    run_id = manager.submit(cfg(train=dict(steps=5000, batch_size=4), checkpoint_every=0, snapshot_every=0))
    _wait_for_step(manager, run_id, 3)
    live = manager.status(run_id)
    assert live.state == "running" and live.eta_s > 0 and live.epoch == pytest.approx(live.step * 4 / 8)
    assert manager.cancel(run_id)
    final = manager.wait(run_id, WAIT_S)
    assert final.state == "cancelled"
    assert final.cancel_requested_step >= 3
    assert final.step <= final.cancel_requested_step + 1  # the step in flight may finish, no more
    assert len(final.history) == final.step and final.history[-1]["step"] == final.step
    status, history = _disk(manager, run_id)
    assert status["state"] == "cancelled" and status["step"] == final.step == len(history)
    card = json.loads((manager.run_dir(run_id) / "checkpoint_last.json").read_text())
    assert card["extra"]["steps_done"] == final.step
    assert final.snapshot is not None and final.snapshot_step == final.step  # the module it stopped with
    assert not manager.cancel(run_id)  # already finished


def test_cancel_of_a_queued_run_never_starts_it(tmp_path, fixture_backbone):
    mgr = RunManager(tmp_path / "runs", fixture_backbone, cpu_workers=0)  # nothing takes CPU runs
    with pytest.raises(ValueError, match="no CPU workers"):
        mgr.submit(cfg())
    mgr.shutdown()
    mgr = RunManager(tmp_path / "runs", fixture_backbone, cpu_threads=1)
    first = mgr.submit(cfg(train=dict(steps=5000, batch_size=4), snapshot_every=0))
    second = mgr.submit(cfg())
    assert mgr.status(second).state == "queued"
    assert mgr.cancel(second) and mgr.status(second).state == "cancelled"
    mgr.cancel(first)
    assert mgr.wait(first, WAIT_S).state == "cancelled"
    assert mgr.status(second).started is None and mgr.status(second).history == []
    mgr.shutdown()


# --- what a finished run shows, and FORT from the queue --------------------------------------------
def _probe(mgr: RunManager, run_id: str) -> torch.Tensor:
    config = mgr.get_config(run_id)
    train_set, val_set = runs.load_task_data(config, 32)
    return (val_set if val_set is not None else train_set).images[config.probe_index]


def test_a_finished_run_always_ends_with_its_final_modules_snapshot(manager):
    """The cadence need not land on the last step (3 steps, every 2) and may be 0 (only the final one):
    either way the record ends with the probe's attention under the saved module, on disk as well."""
    ids = [
        manager.submit(cfg(method="lora", train=dict(steps=3, batch_size=4, lr=5e-2), snapshot_every=every))
        for every in (2, 0)
    ]
    for run_id in ids:
        s = manager.wait(run_id, WAIT_S)
        assert s.state == "done", s.error
        assert s.snapshot is not None and s.snapshot_step == s.step == 3
        final = cls_attention_grid(manager.load_run_module(run_id), _probe(manager, run_id)[None])[0]
        np.testing.assert_allclose(s.snapshot, final, atol=1e-6)
        on_disk = np.load(manager.run_dir(run_id) / "snapshot.npy", allow_pickle=False)
        np.testing.assert_array_equal(on_disk, s.snapshot)
        assert _disk(manager, run_id)[0]["snapshot_step"] == 3
        assert RunManager(manager.root).status(run_id).snapshot_step == 3  # what a restarted app reads


def test_fort_methods_run_from_the_queue_with_prompts_from_their_training_images(
    manager, fixture_backbone, monkeypatch
):
    phases: list[tuple[str | None, str | None]] = []
    real_prepare = FortMixin.prepare_prompts

    def spy(self, *args, **kwargs):  # what the app sees while the worker prepares the prompts
        (live,) = [s for s in manager.list(history=False) if s.state == "running"]
        phases.append((live.phase, _disk(manager, live.run_id)[0]["phase"]))
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(FortMixin, "prepare_prompts", spy)
    small = dict(steps=3, batch_size=4, lr=1e-3)
    ids = {m: manager.submit(cfg(method=m, train=small)) for m in ("fort_full", "fort_lora", "fort_bitfit")}
    for method, run_id in ids.items():
        s = manager.wait(run_id, WAIT_S)
        assert s.state == "done", s.error
        assert len(s.history) == 3 and all(h["fort_attention"] > 0 for h in s.history), method
        assert s.timings["fort_prompts_s"] > 0 and s.phase is None and _disk(manager, run_id)[0]["phase"] is None
    message = "preparing FORT position prompts on 8 training images"
    assert phases == [(message, message)] * 3
    # the same numbers as preparing the prompts by hand on the training set, then training
    config = manager.get_config(ids["fort_lora"])
    train_set, val_set = runs.load_task_data(config, 32)
    method = build_method("fort_lora", fixture_backbone, train_set.num_classes, config.method_config)
    real_prepare(method, train_set)
    expected = train(method, train_set, val_set, TrainConfig(**small, seed=config.seed, num_threads=1))
    got = manager.status(ids["fort_lora"]).history
    assert [h["fort_attention"] for h in got] == pytest.approx([h["fort_attention"] for h in expected.history])
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in expected.history])


def test_a_resumed_fort_run_trains_with_the_prompts_it_started_with(manager, monkeypatch):
    prompts: list[torch.Tensor] = []
    real_prepare, real_step = Executor._prepare_fort, listener._Listener.on_step

    def keep_prompts(self, rec, method, *args):
        out = real_prepare(self, rec, method, *args)
        prompts.append(method.prompt_targets.clone())
        return out

    def cancel_at_step_4(self, step, total, metrics):  # a stop mid-run, at a known step
        real_step(self, step, total, metrics)
        if self.offset == 0 and step == 4:
            self.manager.cancel(self.record.status.run_id)

    monkeypatch.setattr(Executor, "_prepare_fort", keep_prompts)
    monkeypatch.setattr(listener._Listener, "on_step", cancel_at_step_4)
    run_id = manager.submit(cfg(method="fort_bitfit", train=dict(steps=8, batch_size=4, lr=5e-2)))
    stopped = manager.wait(run_id, WAIT_S)
    assert stopped.state == "cancelled" and stopped.step == 4, stopped.error
    manager.resume(run_id)
    final = manager.wait(run_id, WAIT_S)
    assert final.state == "done" and final.resumed_from == 4 and final.step == 8, final.error
    assert [h["step"] for h in final.history] == list(range(1, 9))
    assert len(prompts) == 2 and torch.equal(prompts[0], prompts[1])  # not re-derived from the tuned module


# --- failures -------------------------------------------------------------------------------------
def test_a_failing_run_is_recorded_and_the_next_one_completes(manager, monkeypatch):
    real_train = execute.train

    def flaky_train(method, *args, **kwargs):
        if method.name == "bitfit":
            raise RuntimeError("boom in the training loop")
        return real_train(method, *args, **kwargs)

    monkeypatch.setattr(execute, "train", flaky_train)
    bad = manager.submit(cfg(method="bitfit"))
    out_of_range = manager.submit(cfg(probe_index=99))  # fails in the worker, on real code
    good = manager.submit(cfg())
    s_bad, s_range, s_good = (manager.wait(i, WAIT_S) for i in (bad, out_of_range, good))
    assert s_bad.state == "failed" and s_bad.error_kind == "exception"
    assert s_bad.error == "RuntimeError: boom in the training loop"
    assert "flaky_train" in s_bad.traceback and "boom in the training loop" in s_bad.traceback
    assert s_range.state == "failed" and "probe_index 99 is out of range" in s_range.error
    assert s_good.state == "done" and len(s_good.history) == 4
    status, _ = _disk(manager, bad)
    assert status["state"] == "failed" and "boom" in status["traceback"]
    with pytest.raises(RunError, match="only done runs"):
        manager.load_run_module(bad)


def test_cuda_out_of_memory_is_reported_with_the_batch_size(manager, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(execute, "train", oom)
    s = manager.wait(manager.submit(cfg(train=dict(steps=5, batch_size=6))), WAIT_S)
    assert s.state == "failed" and s.error_kind == "oom"
    assert "out of memory" in s.error and "batch size 6" in s.error
    assert s.memory["oom_batch_size"] == 6


# --- the registry on disk -------------------------------------------------------------------------
def test_registry_survives_a_restart_and_an_interrupted_run_resumes(tmp_path, fixture_backbone):
    root = tmp_path / "runs"
    first = RunManager(root, fixture_backbone, cpu_threads=1)
    done_id = first.submit(cfg(method="vpt"))
    failed_id = first.submit(cfg(probe_index=99))  # fails in the worker: its error must survive too
    done_ids = [first.wait(i, WAIT_S).run_id for i in (done_id, failed_id)]
    long_id = first.submit(cfg(train=dict(steps=12, batch_size=4), checkpoint_every=3))
    before = {i: first.status(i) for i in done_ids}
    # simulate a kill mid-run: stop the run, then leave its record as a dead process would ("running")
    _wait_for_step(first, long_id, 4)
    first.cancel(long_id)
    killed = first.wait(long_id, WAIT_S)
    status_path = first.run_dir(long_id) / "status.json"
    raw = json.loads(status_path.read_text())
    raw.update(state="running", cancel_requested_step=None, ended=None)
    status_path.write_text(json.dumps(raw))
    # the first manager is abandoned: no shutdown

    second = RunManager(root, fixture_backbone, cpu_threads=1)
    assert [s.run_id for s in second.list()] == [*done_ids, long_id]
    for run_id, old in before.items():
        new = second.status(run_id)
        assert new.state == old.state and new.error == old.error and new.traceback == old.traceback
        assert new.history == old.history and new.final == old.final
        assert new.timings == old.timings and new.memory == old.memory and new.step == old.step
        if old.snapshot is not None:
            np.testing.assert_array_equal(new.snapshot, old.snapshot)
    interrupted = second.status(long_id)
    assert (
        interrupted.state == "interrupted" and json.loads(status_path.read_text())["state"] == "interrupted"
    )
    assert len(interrupted.history) == killed.step

    # a done run's module gives back the validation accuracy it recorded
    module = second.load_run_module(done_ids[0])
    _, val = runs.load_task_data(second.get_config(done_ids[0]), 32)
    assert evaluate(module, val)["acc"] == pytest.approx(before[done_ids[0]].final["val_acc"])

    second.resume(long_id)
    resumed = second.wait(long_id, WAIT_S)
    assert resumed.state == "done", resumed.error
    assert resumed.resumed_from == killed.step and resumed.segments == 2
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert resumed.history[: killed.step] == interrupted.history
    assert not (second.run_dir(long_id) / "checkpoint_last.json").exists()  # replaced by module.*
    with pytest.raises(RunError, match="is done; only cancelled, failed, interrupted"):
        second.resume(long_id)

    second.delete(done_ids[1])
    assert not second.run_dir(done_ids[1]).exists()
    assert [s.run_id for s in RunManager(root).list()] == [done_ids[0], long_id]
    second.shutdown()
    first.shutdown()


def test_concurrent_readers_never_see_a_torn_record(tmp_path, fixture_backbone):
    mgr = RunManager(tmp_path / "runs", fixture_backbone, cpu_threads=1, status_interval_s=0.0)
    run_id = mgr.submit(cfg(train=dict(steps=24, batch_size=4, eval_every=8), snapshot_every=3))
    folder = mgr.run_dir(run_id)
    stop = threading.Event()
    problems: list[str] = []
    reads = {"memory": 0, "disk": 0}

    def read_memory() -> None:
        last = -1
        while not stop.is_set():
            s = mgr.status(run_id)
            listed = [x for x in mgr.list(history=False) if x.run_id == run_id]
            if s.step < last or len(s.history) != s.step or len(listed) != 1:
                problems.append(f"memory: step {s.step} after {last}, history {len(s.history)}")
            last = s.step
            reads["memory"] += 1
            time.sleep(0.001)  # tight, but leaves the worker the GIL now and then

    def read_disk() -> None:
        last_step, last_len = -1, -1
        while not stop.is_set():
            try:
                status = json.loads((folder / "status.json").read_text())
                history = json.loads((folder / "history.json").read_text())
                if (folder / "snapshot.npy").exists():
                    np.load(folder / "snapshot.npy", allow_pickle=False)
            except FileNotFoundError:
                continue  # before the first write
            except (json.JSONDecodeError, ValueError) as exc:
                problems.append(f"disk: unreadable file ({exc})")
                continue
            if status["step"] < last_step or len(history) < last_len:
                problems.append(
                    f"disk: went back from {last_step}/{last_len} to {status['step']}/{len(history)}"
                )
            last_step, last_len = status["step"], len(history)
            reads["disk"] += 1
            time.sleep(0.001)

    readers = [threading.Thread(target=read_memory), threading.Thread(target=read_disk)]
    for t in readers:
        t.start()
    final = mgr.wait(run_id, WAIT_S)
    stop.set()
    for t in readers:
        t.join()
    mgr.shutdown()
    assert final.state == "done" and len(final.history) == 24
    assert [h["step"] for h in final.history if "val_acc" in h] == [8, 16, 24]
    assert not problems, problems[:5]
    assert reads["memory"] > 10 and reads["disk"] > 10


# --- other task sources ---------------------------------------------------------------------------
def _image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((220, 40, 40), (40, 60, 220))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (40, 40, 3)).astype(np.uint8)
            pixels[10:30, 10:30] = colour
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_folder_tasks_read_split_layouts_and_refuse_mismatched_classes(tmp_path):
    flat = _image_folder(tmp_path / "flat", per_class=4)
    train_set, val_set = runs.load_task_data(cfg(task=f"folder:{flat}", per_class=3, val_per_class=2), 32)
    assert (len(train_set), len(val_set)) == (4, 4)  # 4 per class loaded, 2 held out per class
    seen = {im.numpy().tobytes() for im in train_set.images}
    assert not any(im.numpy().tobytes() in seen for im in val_set.images)  # held-out images are new
    assert sorted(val_set.labels.tolist()) == [0, 0, 1, 1]
    split = tmp_path / "split"
    _image_folder(split / "train", per_class=3)
    _image_folder(split / "val", per_class=2)
    train_set, val_set = runs.load_task_data(cfg(task=f"folder:{split}", per_class=2, val_per_class=1), 32)
    assert (len(train_set), len(val_set), val_set.class_names) == (4, 2, ["class0", "class1"])
    (split / "val" / "class1").rename(split / "val" / "other")
    with pytest.raises(ValueError, match="differ from those"):
        runs.load_task_data(cfg(task=f"folder:{split}"), 32)


def test_folder_and_episode_tasks_on_two_parallel_cpu_workers(tmp_path, fixture_backbone):
    folder = _image_folder(tmp_path / "shapes")
    mgr = RunManager(tmp_path / "runs", fixture_backbone, cpu_workers=2)
    assert mgr.cpu_threads == max(1, devices._cpu_cores() // 2)  # parallel runs share the cores
    a = mgr.submit(cfg(task=f"folder:{folder}", per_class=2, val_per_class=1, probe_index=1))
    b = mgr.submit(cfg(task=f"episode:2:1:2:folder:{folder}", probe_index=3))
    s_a, s_b = mgr.wait(a, WAIT_S), mgr.wait(b, WAIT_S)
    mgr.shutdown()
    assert s_a.state == "done", s_a.error
    assert (s_a.train_size, s_a.val_size, s_a.class_names) == (4, 2, ["class0", "class1"])
    assert s_b.state == "done", s_b.error
    assert (s_b.train_size, s_b.val_size) == (2, 4)
    assert s_b.started < s_a.ended and s_a.started < s_b.ended  # both ran at once
    assert s_a.threads == s_b.threads == mgr.cpu_threads


# --- several managers on one registry -------------------------------------------------------------
def test_a_second_manager_follows_runs_it_does_not_own(tmp_path, fixture_backbone):
    root = tmp_path / "runs"
    a = RunManager(root, fixture_backbone, cpu_threads=1)
    long_id = a.submit(cfg(train=dict(steps=5000, batch_size=4), snapshot_every=0))
    _wait_for_step(a, long_id, 2)
    b = RunManager(root, fixture_backbone, cpu_threads=1)  # e.g. the app reopened beside a live one
    seen = b.status(long_id)
    assert seen.state == "running" and seen.owner == a.owner  # alive elsewhere: not "interrupted"
    assert json.loads((a.run_dir(long_id) / "status.json").read_text())["state"] == "running"
    with pytest.raises(RunError, match="another manager"):
        b.delete(long_id)
    assert b.cancel(long_id)  # forwarded to the manager that runs it
    stopped = a.wait(long_id, WAIT_S)
    followed = b.wait(long_id, WAIT_S)  # b follows it from disk
    assert stopped.state == followed.state == "cancelled" and followed.step == stopped.step

    new_id = a.wait(a.submit(cfg()), WAIT_S).run_id
    assert new_id in b.rescan()  # a run written by another manager appears
    assert b.status(new_id).history == a.status(new_id).history

    b.resume(long_id)  # b takes the run over; a notices the change on disk and follows it
    _wait_for_step(b, long_id, followed.step + 1)
    a.rescan()
    assert a.status(long_id).state == "running" and a.status(long_id).owner == b.owner
    with pytest.raises(RunError, match="is running"):
        a.resume(long_id)
    assert a.cancel(long_id)  # forwarded to b this time
    assert b.wait(long_id, WAIT_S).state == a.wait(long_id, WAIT_S).state == "cancelled"
    b.shutdown()
    a.shutdown()


def test_a_run_owned_by_a_live_process_is_left_alone_until_it_dies(tmp_path, fixture_backbone):
    import subprocess
    import sys

    root = tmp_path / "runs"
    first = RunManager(root, fixture_backbone, cpu_threads=1)
    run_id = first.wait(first.submit(cfg()), WAIT_S).run_id
    first.shutdown()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status_path = root / run_id / "status.json"
        raw = json.loads(status_path.read_text())
        owner = {
            "host": owners._HOST,
            "pid": other.pid,
            "start": owners._process_start(other.pid),
            "manager": "x",
        }
        raw.update(state="running", owner=owner)
        status_path.write_text(json.dumps(raw))
        mgr = RunManager(root, fixture_backbone, cpu_threads=1)
        assert mgr.status(run_id).state == "running"
        with pytest.raises(RunError, match=f"another process \\(pid {other.pid}"):
            mgr.cancel(run_id)
        with pytest.raises(TimeoutError):
            mgr.wait(run_id, timeout=0.2)
    finally:
        other.kill()
        other.wait()
    mgr.rescan()
    assert mgr.status(run_id).state == "interrupted"
    assert json.loads(status_path.read_text())["state"] == "interrupted"
    mgr.shutdown()
