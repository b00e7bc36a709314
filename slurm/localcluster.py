#!/usr/bin/env python3
"""A real Slurm cluster on this machine, for testing the sbatch scripts: munged, slurmctld, two slurmd.

Debian's ``slurm-wlm`` (22.05) runs several ``slurmd -N nodeX`` daemons on one host when every node has its
own ``Port=`` and ``NodeAddr=127.0.0.1``. Everything lives in one private directory: ``slurm.conf``,
``cgroup.conf``, a munge key and socket generated for it, the controller's state, the daemons' spool,
logs and pid files. Nothing under /etc is used except one idempotent line in /etc/hosts that makes the
node names resolve (``MASTER_ADDR=node1`` inside a job must reach the rank-0 task), added only if missing.

Choices, and why:
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: sandboxes and containers have no
  usable cgroups; linuxproc tracks a step's processes through /proc instead.
- ``CPUs=2`` per node on a 2-core machine: the two nodes oversubscribe the host on purpose (each node
  holds one 1- or 2-CPU task); ``SlurmdParameters=config_overrides`` keeps slurmd from draining a node
  whose declared CPUs differ from the hardware.
- ``DependencyParameters=kill_invalid_depend``: a job whose ``afterok`` dependency can never be satisfied
  (the pretraining failed) is cancelled instead of pending forever.
- ``JobCompType=jobcomp/filetxt``: a permanent record of every finished job (and requeue) in
  ``log/jobcomp.txt``, because there is no accounting database and ``squeue`` forgets finished jobs.
- Free TCP ports are picked at start, so two clusters (two test sessions) do not collide.
- It runs as root, so the directory is claimed with care (:func:`claim_dir`): a ``--dir`` that is a
  symbolic link, is not owned by the caller, or that others may write to is refused; a new one is created
  0700; every file is written fresh (an existing one, link or not, is unlinked first, never written
  through), and every start writes a new munge key, mode 0400 (an old key, perhaps world-readable, is
  never reused: ``munged --force`` would accept it).

Usage::

    python slurm/localcluster.py start --dir /tmp/slurm-test   # prints the SLURM_CONF to export
    SLURM_CONF=/tmp/slurm-test/slurm.conf sbatch --wrap 'srun hostname'
    python slurm/localcluster.py stop --dir /tmp/slurm-test

Every process started here (and every job step, whose slurmstepd inherits slurmd's environment) carries
``UNMIX_LOCALCLUSTER=<dir>``; ``stop`` cancels all jobs, stops the daemons by their pid files and then
ends any process that still carries that marker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

MARKER = "UNMIX_LOCALCLUSTER"
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")


def slurm_installed() -> list[str]:
    """Names of the Slurm/munge programs this launcher needs that are not on PATH (empty when all are)."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in needed if shutil.which(name, path=sbin) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise FileNotFoundError(f"{name} not found: install Debian's slurm-wlm and munge")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_hosts(names: list[str], hosts_file: Path = Path("/etc/hosts")) -> None:
    """Make every node name resolve to 127.0.0.1, appending one line to ``hosts_file`` only if needed."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return
    try:
        with hosts_file.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # unmix slurm/localcluster.py\n")
    except OSError as e:
        raise RuntimeError(
            f"node names {missing} do not resolve and {hosts_file} is not writable ({e}); "
            f"add '127.0.0.1 {' '.join(missing)}' to it"
        ) from e


class ClusterDirError(ValueError):
    """``--dir`` is not a directory this launcher may use as root; the message names it and why."""


def claim_dir(path: str | Path, create: bool) -> Path:
    """``path`` as an absolute directory that is the caller's alone, created 0700 when missing (``create``).

    Refused (:class:`ClusterDirError`): a symbolic link (root would write wherever it points), a
    directory owned by another user or writable by group/others (they could plant links in it), anything
    that is not a directory.
    """
    p = Path(path).absolute()
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not create:
            raise ClusterDirError(f"--dir {p} does not exist") from None
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(p, 0o700)  # fails if something appeared meanwhile
        st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise ClusterDirError(f"--dir {p} is a symbolic link (to {os.readlink(p)}); give a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ClusterDirError(f"--dir {p} is not a directory")
    if st.st_uid != os.geteuid():
        raise ClusterDirError(
            f"--dir {p} is owned by uid {st.st_uid}, not by the caller (uid {os.geteuid()})"
        )
    if st.st_mode & 0o022:
        raise ClusterDirError(
            f"--dir {p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); use a private "
            "directory (mode 0700)"
        )
    os.chmod(p, 0o700)
    return p


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` as a new file with ``mode``: whatever was there (a file, a planted link) is unlinked,
    and the new file is created exclusively without following links."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


class LocalCluster:
    """One controller and ``nodes`` slurmd daemons (``node1``..``nodeN``) rooted in ``root``."""

    def __init__(self, root: str | Path, nodes: int = 2, cpus: int = 2, kill_wait: int = 10) -> None:
        self.root = Path(root).absolute()  # not resolved: a link as --dir is refused, never followed
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.kill_wait = kill_wait
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"

    # ---- environment -------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) plus SLURM_CONF and the marker, for running Slurm clients/jobs."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.root)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
        # A job submitted from inside another job's environment must not inherit its SLURM_* identity.
        for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[key]
        return env

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster and return its completed process."""
        return subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=check
        )

    # ---- configuration -----------------------------------------------------------------------------
    def write_config(self) -> None:
        """Write slurm.conf, cgroup.conf and a new munge key (mode 0400) into the cluster directory, which
        :func:`claim_dir` checks first (created 0700 when missing)."""
        r = claim_dir(self.root, create=True)
        for sub in ("state", "log", "run", "munge", "spool", *(f"spool/{n}" for n in self.node_names)):
            if (r / sub).is_symlink():
                raise ClusterDirError(f"{r / sub} is a symbolic link; remove it (or use a new --dir)")
            (r / sub).mkdir(mode=0o700, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        ctld_port, *node_ports = _free_ports(1 + len(self.node_names))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            for n, p in zip(self.node_names, node_ports, strict=True)
        )
        conf = f"""# Written by slurm/localcluster.py: a private test cluster, not for production.
ClusterName=unmixlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=60
{nodes}
PartitionName=local Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""
        _write_private(self.conf, conf.encode(), 0o644)
        _write_private(
            r / "cgroup.conf", b"# No cgroups in a sandbox: proctrack/linuxproc and task/none.\n", 0o644
        )
        _write_private(r / "munge" / "munge.key", os.urandom(1024), 0o400)  # new on every start

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _daemon_env(self) -> dict[str, str]:
        env = self.env()
        env.pop("PYTHONPATH", None)
        return env

    def _start(self, *args: str) -> None:
        log = self.root / "log" / f"{Path(args[0]).name}.start.log"
        with log.open("a") as out:
            proc = subprocess.run(
                list(args), env=self._daemon_env(), stdout=out, stderr=subprocess.STDOUT, timeout=60
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}; see {log}\n{self.logs()}")

    def start(self, timeout: float = 60) -> LocalCluster:
        """Start munged, slurmctld and the slurmd daemons; return when ``sinfo`` shows every node idle."""
        ensure_hosts(self.node_names)
        self.write_config()
        r = self.root
        self._start(
            _which("munged"),
            # --force only for the socket: munged wants its directory open to all users, this one is
            # private (root's daemons and jobs are its only clients). The key is new and 0400 every start.
            "--force",
            f"--key-file={r}/munge/munge.key",
            f"--socket={self.munge_socket}",
            f"--pid-file={r}/run/munged.pid",
            f"--log-file={r}/log/munged.log",
            f"--seed-file={r}/munge/munged.seed",
        )
        self._start(_which("slurmctld"), "-f", str(self.conf))
        for name in self.node_names:
            self._start(_which("slurmd"), "-f", str(self.conf), "-N", name)
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in self.node_names):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"nodes not idle after {timeout}s: {states}\n{self.logs()}")

    def logs(self, lines: int = 20) -> str:
        """The last ``lines`` of every daemon log, for error messages."""
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {log} <==\n" + "\n".join(tail))
        return "\n".join(out)

    def _pids(self) -> list[int]:
        pids = []
        for pid_file in (self.root / "run").glob("*.pid"):
            try:
                pids.append(int(pid_file.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return pids

    def _marked(self) -> list[int]:
        """Processes whose environment carries this cluster's marker (daemons, slurmstepd, job tasks)."""
        needle = f"{MARKER}={self.root}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, stop the daemons, then end any process still carrying the marker."""
        if self.conf.exists():
            try:
                self.run("scancel", "--full", "--quiet", "--partition=local", check=False, timeout=15)
                self.run("scancel", "--quiet", "--state=PENDING", check=False, timeout=15)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    proc = self.run("squeue", "-h", "-t", "R,CG,PD,CF,S", "-o", "%i", check=False, timeout=15)
                    if proc.returncode != 0 or not proc.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = set(self._pids()) | set(self._marked())
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
        for pid_file in (self.root / "run").glob("*.pid"):
            pid_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "logs"])
    parser.add_argument("--dir", required=True, help="private directory for config, state, logs")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs declared per node (may oversubscribe)")
    args = parser.parse_args(argv)
    try:  # before anything else: this runs as root
        claim_dir(args.dir, create=args.action == "start")
    except (ClusterDirError, OSError) as e:
        print(f"localcluster.py: error: {e}", file=sys.stderr)
        return 2
    missing = slurm_installed()
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install slurm-wlm munge)", file=sys.stderr)
        return 1
    cluster = LocalCluster(args.dir, nodes=args.nodes, cpus=args.cpus)
    if args.action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        cluster.stop()
    else:
        print(cluster.logs(lines=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
