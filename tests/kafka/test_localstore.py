"""The local state store on its own: what makes it discard its content instead of
trusting it (another application or topic, a corrupted or missing checkpoint, a reboot
after an unclean stop, a file LMDB cannot open), and that a writer killed mid-write
leaves the last committed transaction, values and checkpoint together."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from engine.kafka import localstore
from engine.kafka.localstore import Checkpoint, LocalStore, StoreIdentity, record_digest

ID = StoreIdentity("app-engine", "app.run-state", 2)


def _filled(directory: Path, identity: StoreIdentity = ID) -> None:
    store = LocalStore(directory, identity)
    store.write({b"a": b"1"}, {b"b": b"2"}, (), Checkpoint(10, 9, record_digest(b"b", b"2")))
    store.close()


def test_a_clean_store_is_trusted_with_its_checkpoint(tmp_path: Path) -> None:
    _filled(tmp_path)
    store = LocalStore(tmp_path, ID)
    assert store.discarded is None
    assert store.checkpoint == Checkpoint(10, 9, record_digest(b"b", b"2"))
    assert dict(store.active()) == {b"a": b"1"} and store.get(b"b") == b"2"
    store.close()


def test_a_finished_key_leaves_the_active_table(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, ID)
    store.write({b"r": b"running"}, {}, (), Checkpoint(1, 0, b"x" * 32))
    store.write({}, {b"r": b"done"}, (), Checkpoint(2, 1, b"y" * 32))
    assert dict(store.active()) == {} and store.get(b"r") == b"done"
    assert store.counts() == (0, 1)
    store.close()


@pytest.mark.parametrize(
    "other",
    [
        StoreIdentity("other-engine", ID.topic, ID.partition),
        StoreIdentity(ID.application, "other.run-state", 2),
        StoreIdentity(ID.application, ID.topic, 1),
    ],
)
def test_a_store_of_another_application_topic_or_partition_is_discarded(
    tmp_path: Path, other: StoreIdentity
) -> None:
    _filled(tmp_path, other)
    # copied by hand to where this application's store lives
    source = tmp_path / other.application / f"{other.topic}-{other.partition}"
    target = tmp_path / ID.application / f"{ID.topic}-{ID.partition}"
    if source != target:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    store = LocalStore(tmp_path, ID)
    assert store.discarded is not None and "belongs to" in store.discarded
    assert store.checkpoint is None and store.counts() == (0, 0)
    store.close()


def _edit_meta(tmp_path: Path, key: bytes, value: bytes | None) -> None:
    env = lmdb.open(str(tmp_path / ID.application / f"{ID.topic}-{ID.partition}"), max_dbs=3)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


def test_a_corrupted_checkpoint_is_discarded(tmp_path: Path) -> None:
    _filled(tmp_path)
    raw = Checkpoint(10, 9, record_digest(b"b", b"2")).encoded()
    _edit_meta(tmp_path, b"checkpoint", raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])
    store = LocalStore(tmp_path, ID)
    assert store.discarded == "its checkpoint is corrupted"
    assert store.checkpoint is None and store.counts() == (0, 0)
    store.close()


def test_a_missing_checkpoint_is_discarded(tmp_path: Path) -> None:
    _filled(tmp_path)
    _edit_meta(tmp_path, b"checkpoint", None)
    store = LocalStore(tmp_path, ID)
    assert store.discarded == "it has state but no checkpoint"
    assert store.checkpoint is None and store.counts() == (0, 0)
    store.close()


def test_a_store_left_open_is_discarded_after_a_reboot_and_trusted_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path, ID)
    store.write({b"a": b"1"}, {}, (), Checkpoint(3, 2, b"z" * 32))
    store._env.close()  # the process died: never closed
    again = LocalStore(tmp_path, ID)
    assert again.discarded is None and again.checkpoint is not None
    again._env.close()
    monkeypatch.setattr(localstore, "boot_id", lambda: "another-boot")
    rebooted = LocalStore(tmp_path, ID)
    assert rebooted.discarded is not None and "machine restarted" in rebooted.discarded
    assert rebooted.checkpoint is None
    rebooted.close()


def test_a_store_closed_cleanly_is_trusted_after_a_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _filled(tmp_path)
    monkeypatch.setattr(localstore, "boot_id", lambda: "another-boot")
    store = LocalStore(tmp_path, ID)
    assert store.discarded is None and store.checkpoint is not None
    store.close()


def test_a_file_lmdb_cannot_open_is_discarded(tmp_path: Path) -> None:
    _filled(tmp_path)
    data = tmp_path / ID.application / f"{ID.topic}-{ID.partition}" / "data.mdb"
    data.write_bytes(b"not an lmdb file" * 512)
    store = LocalStore(tmp_path, ID)
    assert store.discarded is not None and store.checkpoint is None
    assert store.counts() == (0, 0)
    store.close()


WRITER = """
import sys
from pathlib import Path
from engine.kafka.localstore import Checkpoint, LocalStore, StoreIdentity
store = LocalStore(Path(sys.argv[1]), StoreIdentity("app-engine", "app.run-state", 2))
n = 0
print("ready", flush=True)
while True:
    n += 1
    value = str(n).encode() * 50
    store.write({b"k%04d" % i: value for i in range(2000)}, {}, (),
                Checkpoint(n + 1, n, bytes(32)))
"""


def test_a_writer_killed_mid_write_leaves_values_and_checkpoint_of_one_transaction(
    tmp_path: Path,
) -> None:
    for delay in (0.3, 0.55, 0.8):
        directory = tmp_path / f"kill-{delay}"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE
        )
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        store = LocalStore(directory, ID)
        assert store.discarded is None and store.checkpoint is not None
        n = store.checkpoint.anchor
        assert n > 0
        assert {v for _, v in store.active()} == {str(n).encode() * 50}
        assert store.counts() == (2000, 0)
        store.close()
