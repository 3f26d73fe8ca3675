"""A real single-node SLURM cluster (Debian's slurm-wlm + munge), started and stopped by this test, runs a small sweep
through the submitit SLURM launcher (`launcher=slurm`) end to end.

Everything the cluster needs lives in a private temporary folder (munge key and socket, slurm.conf, state, logs) on
free ports, so it touches neither /etc nor a cluster that may already run on the machine; only the daemons this test
started are stopped. Needs root (slurmd runs as root) and the Debian packages: `apt-get install slurm-wlm munge`
(.ci/run installs them, so CI runs this test for real).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel")


def _why_not() -> str | None:
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a single-node SLURM cluster needs root (slurmd runs as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user: reinstall the munge package"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Cluster:
    """munged + slurmctld + slurmd in the foreground as children of this process, configured under `root`."""

    partition = "clipadapt"

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}  # not some outer job's
        self.env["SLURM_CONF"] = str(root / "slurm.conf")

    def _start(self, command: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.root / f"{Path(command[0]).name}.out", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, **kwargs)
        log.close()
        self.processes.append(process)
        return process

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o711)  # munged wants its socket folder traversable by all and writable by no one else
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        user = pwd.getpwnam("munge")
        for path in (munge, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        socket_path = munge / "munge.socket"
        self._start(["munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                     f"--seed-file={munge}/munged.seed"], user="munge", group="munge")
        self._wait(lambda: socket_path.exists(), "munged did not create its socket")

        host = socket.gethostname().split(".")[0]
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        (self.root / "slurm.conf").write_text(f"""\
ClusterName=clipadapt-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
NodeName={host} CPUs={os.cpu_count()} RealMemory={int(memory_mb * 0.8)} State=UNKNOWN
PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        conf = str(self.root / "slurm.conf")
        self._start(["slurmctld", "-D", "-i", "-f", conf])
        self._start(["slurmd", "-D", "-f", conf])
        self._wait(self._idle, "the node did not become idle")

    def _idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return result.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.rglob("*.log"))
                                 if p.is_file())
                raise RuntimeError(f"{what} (exited: {dead or 'none'})\n{logs}")
            time.sleep(0.1)

    def job_steps(self) -> list[int]:
        """PIDs of the slurmstepd processes of this cluster (slurmd starts them detached; they carry our SLURM_CONF)."""
        mine = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    if mine in (proc / "environ").read_bytes().split(b"\0"):
                        pids.append(int(proc.name))
            except OSError:  # gone meanwhile
                continue
        return pids

    def stop(self) -> None:
        """Cancel this cluster's jobs and let their steps end, then stop the daemons this object started."""
        if all(p.poll() is None for p in self.processes):
            subprocess.run(["scancel", "--full", f"--partition={self.partition}"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20  # a step still reporting to slurmd would outlive it
            while self.job_steps() and time.monotonic() < deadline:
                time.sleep(0.2)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self.job_steps():  # only if a step hung: ours, found by our SLURM_CONF
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm_cluster():
    root = Path(tempfile.mkdtemp(prefix="clipadapt-slurm-"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_through_the_submitit_slurm_launcher(slurm_cluster, session_root, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**slurm_cluster.env, "CLIPADAPT_HOME": str(session_root), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for derived in ("CLIPADAPT_DATA", "CLIPADAPT_CACHE"):
        env.pop(derived, None)
    command = [sys.executable, "-m", "clipadapt.train", "+sweep=grid", "launcher=slurm", "dataset=synthetic",
               "backbone=tiny", "logger=none", "features.train_views=2", "method=tip_adapter", "shots=1,2", "seed=1",
               f"hydra.sweep.dir={sweep}", f"hydra.launcher.partition={slurm_cluster.partition}",
               "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
               "hydra.launcher.timeout_min=5", "features.num_workers=0"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "2 done, 0 skipped, 0 failed" in output  # the launcher collected both jobs' results

    job_ids = set()
    for shots in (1, 2):
        # the folder also names the settings given beside the grid's keys (features.train_views=2, ...)
        (folder,) = (sweep / "tip_adapter" / "tiny" / "synthetic" / f"{shots}shot").glob("seed1*")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (metrics["method"], metrics["shots"], metrics["seed"]) == ("tip_adapter", shots, 1)
        assert json.loads((folder / "status.json").read_text())["status"] == "done"
        job_id = re.search(r"^\s+id: '?(\d+_\d+)'?$", (folder / ".hydra" / "hydra.yaml").read_text(), re.M)
        assert job_id, "the cell did not run as a SLURM array task"
        job_ids.add(job_id.group(1))
        assert (sweep / ".submitit" / job_id.group(1) / f"{job_id.group(1)}_0_result.pkl").is_file()
    assert len(job_ids) == 2
    assert "Allocate JobId=" in (slurm_cluster.root / "slurmctld.log").read_text()  # scheduled by slurmctld
