#!/usr/bin/env python3
"""A real SLURM cluster on this machine: munged, slurmctld and one slurmd per fake node.

For tests and for trying ``examples/slurm/`` without a cluster. It runs Debian's packages
(``slurmctld slurmd slurm-client munge``, Slurm 22.05) as root, with no systemd and no cgroups,
and keeps every configuration, key, socket, state, PID and log file under one directory:

    tools/local_slurm.py install                       # apt-get the packages if missing
    tools/local_slurm.py start --dir /tmp/slurm --nodes 2
    export SLURM_CONF=/tmp/slurm/slurm.conf            # what `start` prints
    sbatch --wait --nodes 2 examples/slurm/train.sbatch --cpu tiny --train-iters 4
    tools/local_slurm.py stop --dir /tmp/slurm

The nodes are named ``n1 .. nN`` and all listen on 127.0.0.1 (Debian's build runs several
slurmd on one machine). Jobs take ``MASTER_ADDR`` from ``scontrol show hostnames``, so the names
must resolve inside jobs: the slurmd are started in a private mount namespace (``unshare -m``)
where a copy of /etc/hosts that adds the node names is bind-mounted over /etc/hosts; the
machine's own file is never touched. ``stop`` cancels the jobs, stops the daemons by their PID
files and then kills whatever is left in that namespace (job steps whose slurmd is gone): it
never kills by process name.

Importable: ``LocalSlurm(directory, nodes=2).start()`` ... ``.stop()``, or as a context manager.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# What start() runs; a missing one means the packages are not installed.
BINARIES = (
    "munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue",
    "unshare", "mount",
)  # fmt: skip
CLUSTER_NAME = "mhclocal"
# extra_conf for trying pre-emption: jobs in `low` are requeued when a `high` job needs their
# nodes; their tasks get SIGTERM at once and SIGKILL after GraceTime.
PREEMPTION_CONF = [
    "PreemptType=preempt/partition_prio",
    "PreemptMode=REQUEUE",
    "PartitionName=low Nodes=ALL PriorityTier=1 GraceTime=60 PreemptMode=REQUEUE",
    "PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF",
]


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"SLURM needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        # The daemons run as root (SlurmUser=root), and unshare -m / mount need CAP_SYS_ADMIN.
        return "the local SLURM cluster runs as root (slurmd, unshare -m, mount --bind)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (
            f"SLURM is not installed (missing {', '.join(missing)}); "
            f"run `{sys.executable} tools/local_slurm.py install` (apt-get install "
            f"{' '.join(PACKAGES)})"
        )
    return None


def install(timeout_s: int = 600) -> str | None:
    """Installs the Debian packages when missing. Returns None on success, else the reason."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "not root: cannot apt-get install " + " ".join(PACKAGES)
    if shutil.which("apt-get") is None:
        return "no apt-get: install " + " ".join(PACKAGES) + " by other means"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get timed out after {timeout_s} s"
    print(f"installed {' '.join(PACKAGES)} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return unavailable_reason()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class LocalSlurm:
    """A SLURM cluster of ``nodes`` fake nodes on this machine, all state under ``directory``.

    Args:
        directory: where the configuration, munge key and socket, state, PID and log files go
            (created; ``stop`` leaves the logs there).
        nodes: how many slurmd (nodes ``n1 .. nN``), each with ``cpus`` CPUs.
        cpus: CPUs each node announces (default: this machine's); they may overlap, jobs on
            different fake nodes share the real cores.
        extra_conf: lines appended to slurm.conf (more partitions, preemption settings).
    """

    def __init__(
        self,
        directory: Path | str,
        nodes: int = 1,
        cpus: int | None = None,
        extra_conf: list[str] | None = None,
    ):
        self.dir = Path(directory).resolve()
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus or os.cpu_count() or 1
        self.extra_conf = list(extra_conf or [])

    @property
    def conf(self) -> Path:
        """The slurm.conf every client command needs in ``SLURM_CONF``."""
        return self.dir / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with ``SLURM_CONF`` pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, timeout_s: float = 30, check: bool = True) -> str:
        """Runs a SLURM client command (``scontrol``, ``sinfo`` ...) against this cluster."""
        done = subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    # Layout under self.dir.
    def _pidfile(self, daemon: str) -> Path:
        return self.dir / "run" / f"{daemon}.pid"

    def _log(self, daemon: str) -> Path:
        return self.dir / "log" / f"{daemon}.log"

    def start(self, timeout_s: float = 60) -> LocalSlurm:
        """Starts munged, slurmctld and the slurmd; returns once every node is idle.

        Raises:
            RuntimeError: a daemon did not come up (the message has its log's tail); whatever
                had started is stopped again.
        """
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if _read_pid(self._pidfile("slurmctld")) or _read_pid(self._pidfile("munged")):
            raise RuntimeError(f"{self.dir} holds PID files: stop that cluster first")
        try:
            self._write_files()
            self._start_munged()
            self._start_slurmctld()
            self._start_slurmds()
            self._wait_idle(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        for sub in ("run", "log", "state", "spool", "munge/etc", "munge/lib"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # munged insists on a 0600 key in a 0700 directory, and a 0755 socket directory.
        (self.dir / "munge/etc").chmod(0o700)
        (self.dir / "munge/lib").chmod(0o700)
        sock_dir = self.dir / "munge/run"
        sock_dir.mkdir(exist_ok=True)
        sock_dir.chmod(0o755)
        key = self.dir / "munge/etc/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

        # The node names resolve to 127.0.0.1 inside the slurmd's private mount namespace.
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        (self.dir / "hosts").write_text(
            hosts.rstrip("\n") + "\n127.0.0.1 " + " ".join(self.nodes) + "\n"
        )

        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.node_ports = node_ports
        d = self.dir
        lines = [
            f"ClusterName={CLUSTER_NAME}",
            # slurmctld checks that it runs on SlurmctldHost: this machine's short name.
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s).
            f"AuthInfo=socket={d}/munge/run/munge.socket,cred_expire=5",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={self._pidfile('slurmctld')}",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self._log('slurmctld')}",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            # No systemd or cgroups here: track job processes through /proc, bind no tasks.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # The fake nodes announce CPUs the machine shares between them.
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/builtin",
            # Schedule pending jobs (a requeued one) every second, not every 60 s.
            "SchedulerParameters=sched_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # Finished jobs leave slurmctld after 5 s (default 300): `sbatch --wait` polls until
            # then and would return up to 30 s late.
            "MinJobAge=5",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            # SIGTERM -> SIGKILL grace on cancel and time limit (the default, stated).
            "KillWait=30",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} State=UNKNOWN"
            )
        lines.append("PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        lines += self.extra_conf
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        d = self.dir
        subprocess.run(
            [
                "munged", "--force",
                f"--socket={d}/munge/run/munge.socket",
                f"--key-file={d}/munge/etc/munge.key",
                f"--log-file={self._log('munged')}",
                f"--pid-file={self._pidfile('munged')}",
                f"--seed-file={d}/munge/lib/munged.seed",
            ],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self._wait_for(lambda: (d / "munge/run/munge.socket").exists(), "munged", 10)

    def _start_slurmctld(self) -> None:
        # -c: no state from an earlier run; -i: ignore state files that fail to load.
        subprocess.run(
            ["slurmctld", "-c", "-i", "-f", str(self.conf)],
            env=self.env(), check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self._wait_for(lambda: "UP" in self.run("scontrol", "ping", check=False), "slurmctld", 30)

    def _start_slurmds(self) -> None:
        # One private mount namespace for all slurmd: inside it the node names resolve. Job
        # steps (slurmstepd and the tasks) inherit it, which is how stop() finds them.
        script = (
            'mount --bind "$0" /etc/hosts || exit\n'
            'for node in "$@"; do slurmd -f "$SLURM_CONF" -N "$node" || exit; done'
        )
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", script, str(self.dir / "hosts"), *self.nodes],
            env=self.env(), check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for node in self.nodes:
            self._wait_for(lambda n=node: _read_pid(self._slurmd_pidfile(n)), f"slurmd {node}", 20)
        namespace = _mount_namespace(_read_pid(self._slurmd_pidfile(self.nodes[0])) or -1)
        if namespace is None or namespace == _mount_namespace(os.getpid()):
            raise RuntimeError(f"slurmd did not start in a private mount namespace ({namespace})")
        (self.dir / "run/namespace").write_text(namespace + "\n")

    def _slurmd_pidfile(self, node: str) -> Path:
        return self.dir / "run" / f"slurmd-{node}.pid"

    def _wait_for(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {timeout_s} s\n{self.log_tails()}")
            time.sleep(0.2)

    def _wait_idle(self, deadline: float) -> None:
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).split()
            idle = dict(zip(states[::2], states[1::2], strict=False))
            if all(idle.get(n, "").startswith("idle") for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle: {idle}\n{self.log_tails()}")
            time.sleep(0.3)

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log (for error messages)."""
        out = []
        for log in sorted((self.dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self, timeout_s: float = 10) -> None:
        """Cancels the jobs and stops exactly what start() started; safe to call twice.

        The daemons are stopped by their PID files; job processes left behind (slurmstepd and
        the tasks, which outlive a slurmd) are found by the private mount namespace they were
        started in.
        """
        ctld = _read_pid(self._pidfile("slurmctld"))
        if ctld and _alive(ctld):
            # Cancel the jobs (SIGTERM to every process), then SIGKILL them: steps that ignore
            # SIGTERM (torchrun in train.sbatch) would otherwise wait for KillWait.
            for signal_args in ([], ["--signal=KILL", "--full"]):
                self.run("scancel", "--quiet", "--user=root", *signal_args, check=False)
                if self._jobs_ended(time.monotonic() + timeout_s / 2):
                    break
        slurmds = [_read_pid(self._slurmd_pidfile(n)) for n in self.nodes]
        slurmds += [_read_pid(p) for p in (self.dir / "run").glob("slurmd-*.pid")]
        _terminate(sorted({p for p in slurmds if p}), timeout_s)
        _terminate([p for p in (ctld, _read_pid(self._pidfile("munged"))) if p], timeout_s)
        self._kill_namespace()
        for pidfile in (self.dir / "run").glob("*.pid"):
            pidfile.unlink(missing_ok=True)

    def _jobs_ended(self, deadline: float) -> bool:
        """Waits until no job is pending, running or completing; False at the deadline."""
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}
        while active & set(self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False).split()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)
        return True

    def _kill_namespace(self) -> None:
        """SIGKILLs every process still in the slurmd's private mount namespace."""
        try:
            namespace = (self.dir / "run/namespace").read_text().strip()
        except OSError:
            return
        if not namespace or namespace == _mount_namespace(os.getpid()):
            return  # never the machine's own namespace
        victims = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                if _mount_namespace(int(entry.name)) == namespace:
                    victims.append(int(entry.name))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (self.dir / "run/namespace").unlink(missing_ok=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI: ``install``, ``check``, ``start --dir D [--nodes N]``, ``stop --dir D``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install the packages if missing")
    sub.add_parser("check", help="say whether a cluster can be started here")
    start = sub.add_parser("start", help="start a cluster; prints the SLURM_CONF to export")
    start.add_argument("--dir", required=True, type=Path)
    start.add_argument("--nodes", type=int, default=1)
    start.add_argument("--cpus", type=int, default=None)
    start.add_argument(
        "--preemption", action="store_true", help="add partitions low and high (high preempts)"
    )
    stop = sub.add_parser("stop", help="stop the cluster started in --dir")
    stop.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "install":
        reason = install()
    elif args.command == "check":
        reason = unavailable_reason()
    elif args.command == "start":
        try:
            extra = PREEMPTION_CONF if args.preemption else None
            cluster = LocalSlurm(args.dir, args.nodes, args.cpus, extra_conf=extra).start()
        except RuntimeError as error:
            reason = str(error)
        else:
            print(f"export SLURM_CONF={cluster.conf}")
            reason = None
    else:
        nodes = len(list((args.dir / "spool").glob("n*"))) or 1
        LocalSlurm(args.dir, nodes=nodes).stop()
        reason = None
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
