"""A stand-in `gcloud compute tpus ...` that keeps state, for whole launches on one machine.

tests/test_launch.py puts a `gcloud` script on PATH that runs this file. State lives in
$FAKE_GCLOUD/state.json; each slice's hosts are folders $FAKE_GCLOUD/NAME/worker-I (each
host's home) whose commands run here as local processes with fake CPU devices, meeting through
a coordinator on 127.0.0.1 as the hosts of a pod do (JAX_* variables stand in for the TPU
metadata JAX reads on a real pod). What it understands, and nothing else (anything else exits 2
naming it, so a launcher flag gcloud lacks fails here too):

  tpu-vm create NAME --accelerator-type=v5p-N --version=V [--spot]   (N/8 hosts, at least 1;
                                                          a NAME that exists is refused)
  tpu-vm describe NAME --format=value(state) | value(networkEndpoints.len())
                       | value(networkEndpoints[0].ipAddress)   (10.0.0.K for the K-th VM made)
  tpu-vm scp FILE NAME:DEST --worker=all
  tpu-vm ssh NAME --worker=all|I --command=CMD     (exit 255 if the slice is not READY)
  tpu-vm delete NAME --quiet
  queued-resources create NAME --node-id=NAME | --node-count=K --node-prefix=P
                   --accelerator-type=T --runtime-version=V [--spot]     (K nodes P-0 .. P-K-1)
  queued-resources describe NAME --format=value(state.state)   (WAITING_FOR_RESOURCES once)
  queued-resources delete NAME --force --quiet
plus, for the tests, `python tests/fake_gcloud.py preempt NAME`: what a spot slice's preemption
does (SIGTERM to its hosts' processes, SIGKILL after 20 s, the slice PREEMPTED, its queued
resource SUSPENDED, the hosts' disks gone).
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

DIR = os.environ.get("FAKE_GCLOUD", "")
STATE = os.path.join(DIR, "state.json")
ZONED = ("--zone=", "--project=")


@contextlib.contextmanager
def locked():
    """One gcloud call at a time reads and writes the state (the launcher and the test's
    `preempt` run side by side); an ssh command itself runs outside the lock."""
    with open(os.path.join(DIR, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load() -> dict:
    if not os.path.exists(STATE):
        return {"nodes": {}, "queued": {}}
    with open(STATE) as f:
        return json.load(f)


def save(state: dict) -> None:
    with open(STATE + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(STATE + ".tmp", STATE)


def flags(words: list[str]) -> tuple[list[str], dict[str, str]]:
    """(positional words, {flag: value}); --zone/--project are accepted and dropped."""
    plain, named = [], {}
    for word in words:
        if word.startswith(ZONED):
            continue
        if word.startswith("--"):
            key, _, value = word[2:].partition("=")
            named[key] = value
        else:
            plain.append(word)
    return plain, named


def refuse(text: str) -> int:
    print(f"ERROR: (gcloud) {text}", file=sys.stderr)
    return 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def home(name: str, worker: int) -> str:
    return os.path.join(DIR, name, f"worker-{worker}")


def make_node(state: dict, name: str, accelerator: str) -> None:
    match = re.fullmatch(r"v5p-(\d+)", accelerator)
    if not match:
        raise ValueError(f"unknown accelerator type {accelerator!r}")
    workers = max(1, int(match.group(1)) // 8)
    shutil.rmtree(os.path.join(DIR, name), ignore_errors=True)
    for worker in range(workers):
        os.makedirs(home(name, worker))
    state["nodes"][name] = {"state": "READY", "workers": workers, "port": free_port(),
                            "ip": f"10.0.0.{state.setdefault('made', 0)}"}
    state["made"] += 1


def processes(name: str) -> list[int]:
    """Every process started on a host of `name` (found by the variable ssh gives them)."""
    mark = f"FAKE_TPU_NODE={name}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def kill(name: str, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
        for pid in processes(name):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while processes(name) and time.monotonic() < deadline:
            time.sleep(0.2)


def ssh(state: dict, name: str, worker: str, command: str) -> list[tuple[dict, str]] | int:
    """(environment, working folder) of each host the command runs on, or 255 as ssh exits
    when the host does not answer."""
    node = state["nodes"].get(name)
    if node is None or node["state"] != "READY":
        print(f"ssh: connect to host {name}: Connection refused", file=sys.stderr)
        return 255
    workers = range(node["workers"]) if worker == "all" else [int(worker)]
    return [({**os.environ, "HOME": home(name, i), "FAKE_TPU_NODE": name,
              "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{node['port']}",
              "JAX_NUM_PROCESSES": str(node["workers"]), "JAX_PROCESS_ID": str(i),
              "JAX_PLATFORMS": "cpu", "PATH": f"{os.path.join(DIR, 'bin')}:{os.environ['PATH']}"},
             home(name, i)) for i in workers]


def run_on_hosts(hosts: list[tuple[dict, str]], command: str) -> int:
    procs = [subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env) for env, cwd in hosts]
    return max(p.wait() for p in procs)


def tpu_vm(state: dict, verb: str, plain: list[str], named: dict[str, str]) -> int:
    if verb == "create":
        if plain[0] in state["nodes"]:
            return refuse(f"ALREADY_EXISTS: TPU VM {plain[0]}")
        make_node(state, plain[0], named["accelerator-type"])
        if not named.get("version"):
            return refuse("--version is required")
        save(state)
        return 0
    name = plain[0] if plain else ""
    node = state["nodes"].get(name.split(":")[0])
    if verb == "describe":
        if node is None:
            return refuse(f"NOT_FOUND: TPU VM {name}")
        print({"value(state)": node["state"],
               "value(networkEndpoints.len())": node["workers"],
               "value(networkEndpoints[0].ipAddress)": node["ip"]}[named["format"]])
        return 0
    if verb == "scp":
        target, _, dest = plain[1].partition(":")
        node = state["nodes"].get(target)
        if node is None or node["state"] != "READY" or named.get("worker") != "all":
            return refuse(f"scp to {plain[1]} failed")
        for i in range(node["workers"]):
            shutil.copy(plain[0], os.path.join(home(target, i), dest))
        return 0
    if verb == "delete":
        if node is None:
            return refuse(f"NOT_FOUND: TPU VM {name}")
        kill(name, 0)
        del state["nodes"][name]
        shutil.rmtree(os.path.join(DIR, name), ignore_errors=True)
        save(state)
        return 0
    return refuse(f"unknown command tpu-vm {verb}")


def queued(state: dict, verb: str, plain: list[str], named: dict[str, str]) -> int:
    name = plain[0]
    if verb == "create":
        if name in state["queued"]:
            return refuse(f"ALREADY_EXISTS: queued resource {name}")
        count = int(named.get("node-count", 1))
        if "runtime-version" not in named or (named.get("node-id") != name if count == 1 else
                                              "node-id" in named or "node-prefix" not in named):
            return refuse("--runtime-version and --node-id (or --node-count > 1 and "
                          "--node-prefix) are required")
        nodes = [name] if count == 1 else [f"{named['node-prefix']}-{i}" for i in range(count)]
        state["queued"][name] = {"state": "WAITING_FOR_RESOURCES", "nodes": nodes,
                                 "accelerator": named["accelerator-type"]}
        save(state)
        return 0
    request = state["queued"].get(name)
    if request is None:
        return refuse(f"NOT_FOUND: queued resource {name}")
    if verb == "describe":
        if named.get("format") != "value(state.state)":
            return refuse(f"unsupported --format={named.get('format')}")
        print(request["state"])
        if request["state"] == "WAITING_FOR_RESOURCES":  # capacity arrives at the next look
            request["state"] = "ACTIVE"
            for node in request["nodes"]:
                make_node(state, node, request["accelerator"])
        save(state)
        return 0
    if verb == "delete":
        if "force" not in named:
            return refuse("the queued resource has a node: --force is needed")
        for node in request["nodes"]:
            if node in state["nodes"]:
                kill(node, 0)
                del state["nodes"][node]
                shutil.rmtree(os.path.join(DIR, node), ignore_errors=True)
        del state["queued"][name]
        save(state)
        return 0
    return refuse(f"unknown command queued-resources {verb}")


def preempt(state: dict, name: str) -> int:
    """NAME: a TPU VM, or a queued resource (all its nodes)."""
    nodes = state["queued"][name]["nodes"] if name in state["queued"] else [name]
    for node in nodes:
        kill(node, 20)
        state["nodes"][node]["state"] = "PREEMPTED"
        shutil.rmtree(os.path.join(DIR, node), ignore_errors=True)
    if name in state["queued"]:
        state["queued"][name]["state"] = "SUSPENDED"
    save(state)
    return 0


def fake_uv(folder: str) -> None:
    """`uv` on the hosts' PATH: `uv venv ... DIR` makes DIR/bin/python this test's interpreter
    (whose environment has lmjax's dependencies); `uv pip install` has nothing left to do."""
    os.makedirs(folder, exist_ok=True)
    python, uv = os.path.join(folder, "venv-python"), os.path.join(folder, "uv")
    with open(python, "w") as f:
        f.write(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    with open(uv, "w") as f:
        f.write(f'#!/bin/bash\nif [ "$1" = venv ]; then d="${{@: -1}}"; mkdir -p "$d/bin" && '
                f'cp {python} "$d/bin/python"; fi\n')
    for path in (python, uv):
        os.chmod(path, 0o755)


def main(argv: list[str]) -> int:
    with locked():
        state = load()
        if argv[:1] == ["preempt"]:
            return preempt(state, argv[1])
        if argv[:2] != ["compute", "tpus"] or len(argv) < 4:
            return refuse(f"unknown command {' '.join(argv[:4])}")
        plain, named = flags(argv[4:])
        group, verb = argv[2], argv[3]
        if group == "queued-resources":
            return queued(state, verb, plain, named)
        if group != "tpu-vm":
            return refuse(f"unknown command group {group}")
        if verb != "ssh":
            return tpu_vm(state, verb, plain, named)
        hosts = ssh(state, plain[0], named["worker"], named["command"])
        if not os.path.exists(os.path.join(DIR, "bin", "uv")):
            fake_uv(os.path.join(DIR, "bin"))
    return hosts if isinstance(hosts, int) else run_on_hosts(hosts, named["command"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
