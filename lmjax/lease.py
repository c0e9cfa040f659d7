"""One run per workdir: a lease taken before anything is written, refreshed while the run lives.

Two runs on one workdir would interleave their metrics rows and overwrite each other's
checkpoints. The lease is a numbered object `WORKDIR/lease/<k>.json` (host, pid, run id, start
time, heartbeat), created only if absent (paths.create_new: a hard link on a disk,
`ifGenerationMatch=0` on GCS), so of two runs that race for the same number exactly one
wins. The holder rewrites its own object every few seconds (the heartbeat). A newcomer refuses
while the latest lease is live; one whose heartbeat stopped for `timeout` seconds (a killed run,
a preempted VM), or whose holder is a dead process on this very host, is taken over by creating
the next number, with a warning.

Numbers only grow, and the latest object is never deleted (a finished run marks it released):
so a holder that was presumed dead and wakes up sees a higher number and knows it has lost the
workdir, with no conditional delete or rewrite that a plain filesystem lacks. The training loop
asks `check()` before every step and save; a lost lease stops the run without saving.

In a multi-host run process 0 holds the lease for all (`distributed.shared_workdir`).
"""

import dataclasses
import json
import os
import re
import secrets
import socket
import threading
import time
import warnings

from etils import epath

from lmjax import paths

FOLDER = "lease"


class Busy(RuntimeError):
    """The workdir is another run's, or this run's lease was taken over."""


@dataclasses.dataclass
class Lease:
    """A held lease; `check()` raises Busy once another run has taken the workdir."""

    path: epath.Path
    number: int
    record: dict
    timeout: float
    lost: str = ""
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def run_id(self) -> int:
        """31 random bits: an int32, as JAX (x64 off) broadcasts it to the other processes."""
        return self.record["run"]

    @property
    def interval(self) -> float:
        return min(30.0, self.timeout / 5)

    def check(self) -> None:
        """Raise Busy if the workdir is no longer this run's. Looks at the store itself when
        the last heartbeat is overdue: a process that was frozen (a suspended VM) for longer
        than the timeout may have lost the workdir while its heartbeat thread slept too."""
        if not self.lost and time.time() - self.record["heartbeat"] > 2 * self.interval:
            self.beat()
        if self.lost:
            raise Busy(self.lost)

    def beat(self) -> None:
        """Refresh the heartbeat, unless a later lease exists: then remember the run lost it."""
        later = [n for n in _numbers(self.path.parent) if n > self.number]
        if later:
            holder = _read(self.path.parent / f"{max(later)}.json") or {}
            self.lost = (f"Run {holder_name(holder)} took over workdir {self.path.parent.parent}, "
                         f"whose lease this run had not refreshed for {self.timeout:g} s "
                         f"(train.lease_timeout); this run stops without saving.")
            return
        self.record["heartbeat"] = time.time()
        self.path.write_text(json.dumps(self.record))

    def start_heartbeat(self) -> None:
        interval = self.interval

        def loop():
            while not self._stop.wait(interval) and not self.lost:
                try:
                    self.beat()
                except OSError as e:  # a network blip: the next beat may land
                    warnings.warn(f"could not refresh the workdir lease {self.path}: {e}",
                                  stacklevel=1)

        self._thread = threading.Thread(target=loop, name="lmjax-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released, so the next run need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and not [n for n in _numbers(self.path.parent) if n > self.number]:
            self.path.write_text(json.dumps({**self.record, "released": True}))


def holder_name(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"


def _numbers(folder: epath.Path) -> list[int]:
    if not folder.exists():
        return []
    return [int(p.name[:-5]) for p in folder.iterdir() if re.fullmatch(r"\d+\.json", p.name)]


def _read(path: epath.Path) -> dict | None:
    """A lease record, or None if it vanished or is torn (then it counts as stale)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dead_here(record: dict) -> bool:
    """The holder is a process of this host that no longer runs (or is a zombie)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    try:
        with open(f"/proc/{int(record['pid'])}/stat") as f:  # noqa: PTH123 - not a user path
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _why_free(record: dict | None, timeout: float) -> str | None:
    """Why the latest lease may be taken ('' if it was released), or None while it is live."""
    if record is None:
        return "its lease record is unreadable"
    if record.get("released"):
        return ""
    age = time.time() - float(record.get("heartbeat", 0))
    if age > timeout:
        return f"its last heartbeat was {age:.0f} s ago (train.lease_timeout={timeout:g})"
    if _dead_here(record):
        return "that process is no longer running"
    return None


def acquire(workdir: paths.PathLike, timeout: float, processes: int = 1) -> Lease:
    """Take the workdir's lease, or raise Busy naming the run that holds it."""
    folder = paths.resolve(workdir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        numbers = _numbers(folder)
        latest = max(numbers, default=-1)
        if latest >= 0:
            record = _read(folder / f"{latest}.json")
            why = _why_free(record, timeout)
            if why is None:
                raise Busy(f"Workdir {workdir} is in use by the run of {holder_name(record)}, "
                           f"started {record.get('started', '?')}; wait for it, stop it, or use "
                           f"another --workdir (a lease whose heartbeat stops is taken over "
                           f"after train.lease_timeout={timeout:g} s).")
            if why:
                warnings.warn(f"taking over workdir {workdir} from the run of "
                              f"{holder_name(record or {})}: {why}.", stacklevel=2)
        now = time.time()
        record = {"run": secrets.randbits(31), "host": socket.gethostname(), "pid": os.getpid(),
                  "processes": processes, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "heartbeat": now}
        path = folder / f"{latest + 1}.json"
        try:
            if paths.create_new(path, json.dumps(record).encode()):
                break  # else another run took this number first: look again
        except OSError as e:  # a full disk, a read-only mount, a bucket one may not write
            raise OSError(e.errno, f"Cannot write the lease of workdir {workdir} ({path}): "
                                   f"{e.strerror or e}") from None
    for old in numbers:  # the latest stays: a woken holder must see a higher number
        (folder / f"{old}.json").unlink(missing_ok=True)
    lease = Lease(path, latest + 1, record, timeout)
    lease.start_heartbeat()
    return lease


def holds(workdir: paths.PathLike, number: int, run_id: int) -> bool:
    """Whether lease `number` in this workdir, as this process sees it, is run `run_id`'s: how
    the other processes of a multi-host run check that they share process 0's workdir."""
    record = _read(paths.resolve(workdir) / FOLDER / f"{number}.json")
    return record is not None and record.get("run") == run_id
