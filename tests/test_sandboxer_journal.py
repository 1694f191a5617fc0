"""The sandboxer's state journal: what a restart reads back after torn, corrupt or failed writes."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwasm.sandboxer import model
from kwasm.sandboxer.model import JOURNAL_FILE, Process, Sandbox, StateStore, Task, pod_meta


def _sandbox(sandbox_id: str, *tasks: str) -> Sandbox:
    sandbox = Sandbox(
        id=sandbox_id, created_at=time.time(), name=sandbox_id, namespace="default", uid=f"uid-{sandbox_id}",
        pod_meta=pod_meta({"app": sandbox_id}, {"note": "a\nb"}),
    )
    for task_id in tasks:
        sandbox.tasks[task_id] = Task(task_id, sandbox_id, f"/bundles/{task_id}", Process(exec_id=""))
    return sandbox


def _reload(root: Path) -> dict[str, Sandbox]:
    return {sandbox.id: sandbox for sandbox in StateStore(root).load_all()}


def _records(root: Path) -> list[bytes]:
    return (root / JOURNAL_FILE).read_bytes().splitlines()


def test_a_record_round_trips_with_its_labels_annotations_and_tasks(tmp_path: Path) -> None:
    StateStore(tmp_path).save(_sandbox("pod1", "c1", "c2"))
    (loaded,) = _reload(tmp_path).values()
    assert (loaded.id, loaded.name, loaded.namespace, loaded.uid) == ("pod1", "pod1", "default", "uid-pod1")
    assert json.loads(loaded.pod_meta) == {"labels": {"app": "pod1"}, "annotations": {"note": "a\nb"}}
    assert list(loaded.tasks) == ["c1", "c2"]
    assert loaded.tasks["c2"].bundle == "/bundles/c2"


def test_a_torn_last_record_falls_back_to_the_version_before(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(_sandbox("pod1"))
    store.save(_sandbox("pod2"))
    store.save(_sandbox("pod1", "c1"))  # the write a kill -9 cuts short
    path = tmp_path / JOURNAL_FILE
    os.truncate(path, path.stat().st_size - 20)
    loaded = _reload(tmp_path)
    assert sorted(loaded) == ["pod1", "pod2"]
    assert loaded["pod1"].tasks == {}  # the whole older record, never half of the newer one
    assert len(_records(tmp_path)) == 2  # reload rewrote the journal without the torn tail
    StateStore(tmp_path).save(_sandbox("pod3"))
    assert sorted(_reload(tmp_path)) == ["pod1", "pod2", "pod3"]


def test_appending_after_a_torn_record_without_a_reload_keeps_the_new_record(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(_sandbox("pod1"))
    store.journal.close()
    with (tmp_path / JOURNAL_FILE).open("ab") as journal:
        journal.write(b'0badf00d {"id":"half')
    StateStore(tmp_path).save(_sandbox("pod2", "c1"))
    loaded = _reload(tmp_path)
    assert sorted(loaded) == ["pod1", "pod2"]
    assert list(loaded["pod2"].tasks) == ["c1"]


def test_a_corrupt_record_is_skipped_and_the_others_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for name in ("pod1", "pod2", "pod3"):
        store.save(_sandbox(name))
    lines = _records(tmp_path)
    lines[1] = lines[1].replace(b"pod2", b"pod9")  # the checksum no longer matches
    (tmp_path / JOURNAL_FILE).write_bytes(b"\n".join(lines) + b"\n")
    assert sorted(_reload(tmp_path)) == ["pod1", "pod3"]


def test_removed_sandboxes_stay_removed_and_the_journal_goes_with_the_last(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    live = {name: _sandbox(name) for name in ("pod1", "pod2")}
    for sandbox in live.values():
        store.save(sandbox)
    store.remove("pod1")
    del live["pod1"]
    store.settle(live.values())
    assert sorted(_reload(tmp_path)) == ["pod2"]
    store = StateStore(tmp_path)
    store.load_all()
    store.remove("pod2")
    store.settle([])
    assert os.listdir(tmp_path) == []


def test_a_journal_mostly_of_old_versions_is_compacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "COMPACT_MIN", 0)
    store = StateStore(tmp_path)
    live = {name: _sandbox(name) for name in ("pod1", "pod2", "gone")}
    for _ in range(3):
        for sandbox in live.values():
            store.save(sandbox)
    store.remove("gone")
    del live["gone"]
    store.settle(live.values())
    assert len(_records(tmp_path)) == 2
    assert sorted(_reload(tmp_path)) == ["pod1", "pod2"]


def test_sandboxes_of_the_per_directory_layout_move_into_the_journal(tmp_path: Path) -> None:
    old = _sandbox("old", "c1")
    record = json.loads(old.record())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / model.LEGACY_FILE).write_text(json.dumps(record))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / model.LEGACY_FILE).write_text("{")
    loaded = _reload(tmp_path)
    assert list(loaded) == ["old"]
    assert list(loaded["old"].tasks) == ["c1"]
    assert sorted(os.listdir(tmp_path)) == [JOURNAL_FILE]
    assert list(_reload(tmp_path)) == ["old"]


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail or come out short (RLIMIT_FSIZE): a full disk, for a while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_that_does_not_fit_leaves_no_partial_record(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved: list[str] = []
    with _file_size_limit(4096):
        for index in range(20):
            try:
                store.save(_sandbox(f"pod{index}", "c1"))
            except OSError:
                continue
            saved.append(f"pod{index}")
        assert 0 < len(saved) < 20
        assert (tmp_path / JOURNAL_FILE).stat().st_size <= 4096
    store.save(_sandbox("after"))  # the disk has room again: this record must not be glued to a torn one
    assert sorted(_reload(tmp_path)) == sorted([*saved, "after"])
