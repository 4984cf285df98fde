"""A real 2-node Ray cluster on one machine, whose worker node cannot see the workspace.

The head (`ray start --head --num-cpus=0`) runs nothing but Ray's own services, so every actor
and Ray Train worker must go to the worker node. The worker node runs in its own mount
namespace (`unshare -m`, root only) in which empty tmpfs mounts hide /tmp (the driver's
temporary folder, and with it the test's project: data, artifacts, metrics, .latentforge, the
DVC cache, the MLflow store) and the repository's own data and output folders. What an image
would give a real node stays visible: the Python environment and the code.

Nodes share a token as a real cluster does (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Every
process the cluster starts carries a marker in its environment, so `stop` finds and kills
them all, and the namespace (with its mounts) goes with its last process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import free_port

BIN = Path(sys.executable).parent
MARKER = "LATENTFORGE_TEST_CLUSTER"


class TwoNodeCluster:
    def __init__(self, hide: list[Path], worker_cpus: int = 2) -> None:
        self.hide = [Path(p) for p in hide]
        self.worker_cpus = worker_cpus
        self.marker = secrets.token_hex(8)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray's socket paths under it must stay below the 107-byte limit.
        self.temp_dir = tempfile.mkdtemp(prefix="lfray-", dir="/tmp")
        self.env = {**os.environ, MARKER: self.marker, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        # The nodes have S3 credentials (as an instance profile gives them) but not the
        # driver's endpoint or region: the job's runtime_env brings those
        # (raycluster.FORWARDED_ENV), or their checkpoints would go elsewhere.
        from latentforge.raycluster import FORWARDED_ENV

        for name in FORWARDED_ENV:
            self.env.pop(name, None)
        self.head: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.logs = Path(self.temp_dir) / "logs"
        self.logs.mkdir()
        self._fds: list[int] = []

    # The driver's view: what `latentforge run` needs in its environment.
    def driver_env(self) -> dict[str, str]:
        return {k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}

    def start(self, timeout: float = 120.0) -> None:
        ray = str(BIN / "ray")
        self.head = subprocess.Popen(
            [ray, "start", "--head", "--num-cpus=0", "--num-gpus=0", "--block",
             f"--port={self.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=self.env, start_new_session=True,
            stdout=self._log("head"), stderr=subprocess.STDOUT)
        self._wait_for(lambda nodes: len(nodes) >= 1, timeout, "the head node")
        self.start_worker(timeout)

    def start_worker(self, timeout: float = 120.0) -> None:
        """(Re)start the worker node in its own mount namespace; waits until it joined."""
        ray = str(BIN / "ray")
        mounts = " && ".join(f"mount -t tmpfs none {p}" for p in ["/tmp", *self.hide]
                             if p == "/tmp" or Path(p).is_dir())
        start = (f"exec {ray} start --address={self.address} --num-cpus={self.worker_cpus} "
                 f"--num-gpus=0 --node-ip-address=127.0.0.1 --block --disable-usage-stats "
                 f"--dashboard-agent-listen-port={free_port()}")
        self.worker = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && {start}"],
            env=self.env, start_new_session=True,
            stdout=self._log("worker"), stderr=subprocess.STDOUT)
        self._wait_for(lambda nodes: len(nodes) >= 2, timeout, "the worker node")

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet, as a crashed machine would lose it; returns its
        PID. The node's other processes go down with it (stop_worker reaps what is left)."""
        import psutil

        assert self.worker is not None
        for child in psutil.Process(self.worker.pid).children(recursive=True):
            if child.name() == "raylet":
                os.kill(child.pid, signal.SIGKILL)
                return child.pid
        raise RuntimeError("the worker node has no raylet")

    def stop_worker(self) -> None:
        """Kill the worker node's whole process tree (and with it its mount namespace)."""
        import psutil

        if self.worker is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.worker.pid)
            for proc in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        self.worker.wait(timeout=30)

    def restart_worker(self, timeout: float = 180.0) -> None:
        """A node that comes back: the old one's processes reaped, a fresh one joins."""
        self.stop_worker()
        # The head notices the dead raylet (its heartbeats stop) before the new node counts.
        deadline = time.monotonic() + timeout
        while len(self.nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        self.start_worker(timeout)

    def _log(self, name: str) -> int:
        """A file descriptor for a node's output (the child keeps its own copy)."""
        fd = os.open(self.logs / f"{name}.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._fds.append(fd)
        return fd

    def nodes(self) -> list[dict]:
        """Alive nodes as Ray reports them (NodeID, Resources), asked from a fresh driver."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print('NODES=' + json.dumps([{'id': n['NodeID'], "
                "'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                             text=True, timeout=120)
        found = [line for line in out.stdout.splitlines() if line.startswith("NODES=")]
        if out.returncode != 0 or not found:  # Ray may print warnings on stdout, too
            return []
        return json.loads(found[-1][len("NODES="):])

    def worker_node_id(self) -> str:
        (node,) = [n["id"] for n in self.nodes() if n["cpus"] > 0]
        return node

    def head_node_id(self) -> str:
        (node,) = [n["id"] for n in self.nodes() if n["cpus"] == 0]
        return node

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, name in ((self.head, "head"), (self.worker, "worker")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"the {name} node exited ({proc.returncode}):\n"
                                       + (self.logs / f"{name}.out").read_text()[-3000:])
            if ready(self.nodes()):
                return
            time.sleep(1)
        raise TimeoutError(f"{what} did not join within {timeout:.0f} s")

    def processes(self) -> list[int]:
        """PIDs of every process started for this cluster (found by the environment marker)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if f"{MARKER}={self.marker}".encode() in (entry / "environ").read_bytes().split(
                        b"\0"):
                    pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in (self.worker, self.head):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
        deadline = time.monotonic() + 15
        while (left := [p for p in self.processes() if p != os.getpid()]) and \
                time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
