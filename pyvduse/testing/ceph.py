"""A Ceph cluster for tests: one monitor and one OSD on 127.0.0.1, from Debian's own
``ceph-mon``/``ceph-osd``/``ceph-common`` packages, ready in seconds.

The OSD keeps its objects in memory (memstore: no disk to prepare, its memory grows with the
data written), the pool ``rbd`` has one replica. With ``cephx=True`` the cluster requires
cephx and writes a keyring for ``client.admin`` (``keyring``); otherwise it runs without
auth. ``stop()`` ends the daemons (the OSD first) and removes the directory.
``restart_osd()`` stops the OSD (SIGTERM: memstore writes its objects to the OSD's
directory as it unmounts, and reads them back at the next start) and starts it again;
``kill_osd()`` ends it for good. Used by tests/vm/test_rbd_e2e.py inside the test VM and by
the host's backend tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

#: The commands a cluster needs, and the Debian package of each.
PACKAGES = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "ceph": "ceph-common", "rbd": "ceph-common"}

_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port},v1:127.0.0.1:{port1}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = true
ms bind ipv6 = false
auth cluster required = {auth}
auth service required = {auth}
auth client required = {auth}
keyring = {keyring}
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
paxos propose interval = 0.1
paxos min wait = 0.01
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = {store}
memstore device bytes = 1073741824
memstore page set = true
osd op num shards = 1
osd op num threads per shard = 2
# a stopping OSD unmounts its store: memstore then writes its objects out (kept across a restart)
osd fast shutdown = false
# a dead client's watch (and so its exclusive lock) goes after this long, not 30 s
osd client watch timeout = 5
[mon]
mon data = {d}/mon/ceph-$id
[osd]
osd data = {d}/osd/ceph-$id
keyring = {d}/osd/ceph-$id/keyring
# a host name of its own: a guest without one ("(none)") makes the OSD refuse to start
crush location = root=default host=minicluster
"""


class CephUnavailable(RuntimeError):
    """The Ceph packages are not installed."""


def missing_packages() -> list[str]:
    """The Debian packages a cluster needs that are not installed."""
    return sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd, path=_PATH) is None})


_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


class CephCluster:
    """One monitor and one OSD in ``directory`` (a new temporary one by default)."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        port: int = 13300,
        cephx: bool = False,
        store: str = "memstore",
        ready_seconds: float = 120.0,
    ) -> None:
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="ceph."))
        self.port = port
        self.cephx = cephx
        self.store = store
        self.ready_seconds = ready_seconds
        self.conf = self.dir / "ceph.conf"
        self.keyring = self.dir / "keyring"
        self.mon: subprocess.Popen[bytes] | None = None
        self.osd: subprocess.Popen[bytes] | None = None
        self.osd_uuid = ""

    # -- commands ---------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """``ceph ARGS`` against this cluster; its output (CalledProcessError on failure)."""
        return self._run("ceph", "--connect-timeout", str(int(timeout)), *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """``rbd ARGS`` against this cluster."""
        return self._run("rbd", *args, timeout=timeout)

    def _run(self, tool: str, *args: str, timeout: float) -> str:
        env = dict(os.environ, PATH=_PATH)
        out = subprocess.run(
            [tool, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise subprocess.CalledProcessError(out.returncode, [tool, *args], out.stdout, out.stderr)
        return out.stdout

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> CephCluster:
        """Make and start the cluster (on failure: nothing left running)."""
        try:
            return self._start()
        except BaseException:
            self.stop(remove=False)
            raise

    def _start(self) -> CephCluster:
        missing = missing_packages()
        if missing:
            raise CephUnavailable(f"a test Ceph cluster needs: apt-get install {' '.join(missing)}")
        d = self.dir
        for sub in ("run", "log", "crash", "mon/ceph-a", "osd/ceph-0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        auth = "cephx" if self.cephx else "none"
        keyring = str(self.keyring) if self.cephx else "/dev/null"
        self.conf.write_text(
            _CONF.format(
                fsid=fsid,
                port=self.port,
                port1=self.port + 1,
                auth=auth,
                keyring=keyring,
                d=d,
                store=self.store,
            )
        )
        env = dict(os.environ, PATH=_PATH)
        addr = f"[v2:127.0.0.1:{self.port},v1:127.0.0.1:{self.port + 1}]"
        subprocess.run(
            ["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a", addr, str(d / "monmap")],
            check=True,
            capture_output=True,
            env=env,
        )
        mkfs = ["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap")]
        if self.cephx:
            self._make_keyrings(env)
            mkfs += ["--keyring", str(d / "mon.keyring")]
        self._logged(mkfs, "mkfs-mon", env)
        self.mon = self._daemon(["ceph-mon", "-c", str(self.conf), "-f", "-i", "a"], "mon", env)
        self._until(lambda: self._ok("mon", "stat"), "the monitor")
        self.osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", self.osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"the new OSD got id {osd_id!r}, not 0")
        osd_mkfs = ["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid]
        if self.cephx:
            self._osd_key(env)
        self._logged(osd_mkfs, "mkfs-osd", env)
        self.start_osd()
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.ceph("osd", "pool", "set", "rbd", "size", "1", "--yes-i-really-mean-it")
        self.rbd("pool", "init", "rbd")
        return self

    def _make_keyrings(self, env: dict[str, str]) -> None:
        d = self.dir
        tool = "ceph-authtool"
        self._logged(
            [
                tool,
                "--create-keyring",
                str(d / "mon.keyring"),
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
            "keyring-mon",
            env,
        )
        self._logged(
            [
                tool,
                "--create-keyring",
                str(self.keyring),
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
            "keyring-admin",
            env,
        )
        self._logged(
            [tool, str(d / "mon.keyring"), "--import-keyring", str(self.keyring)], "keyring-import", env
        )

    def _osd_key(self, env: dict[str, str]) -> None:
        osd_keyring = self.dir / "osd" / "ceph-0" / "keyring"
        self._logged(
            ["ceph-authtool", "--create-keyring", str(osd_keyring), "--gen-key", "-n", "osd.0"],
            "keyring-osd",
            env,
        )
        self.ceph(
            "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "-i", str(osd_keyring)
        )

    def start_osd(self) -> None:
        env = dict(os.environ, PATH=_PATH)
        self.osd = self._daemon(["ceph-osd", "-c", str(self.conf), "-f", "-i", "0"], "osd", env)
        self._until(self.osd_up, "the OSD")

    def osd_up(self) -> bool:
        try:
            return any(
                line.startswith("osd.0 up") for line in self.ceph("osd", "dump", timeout=10).splitlines()
            )
        except (subprocess.SubprocessError, OSError):
            return False

    def restart_osd(self, down_seconds: float = 0.0) -> None:
        """Stop the OSD (SIGTERM, its data kept), wait ``down_seconds``, start it again."""
        assert self.osd is not None
        self.osd.terminate()
        self.osd.wait(60)
        time.sleep(down_seconds)
        self.start_osd()

    def pause_osd(self, seconds: float) -> None:
        """Freeze the OSD for ``seconds`` (SIGSTOP, SIGCONT): requests in flight wait."""
        assert self.osd is not None
        self.osd.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.osd.send_signal(signal.SIGCONT)

    def kill_osd(self) -> None:
        """The OSD dies (SIGKILL) and stays down: a cluster gone for good."""
        if self.osd is not None:
            self.osd.kill()
            self.osd.wait()
            self.osd = None

    def stop(self, remove: bool = True) -> None:
        """End the daemons (OSD first, then the monitor) and remove the directory."""
        for p in (self.osd, self.mon):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.osd = self.mon = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("mon.out", "osd.out", "ceph-mon.a.log", "ceph-osd.0.log"):
            p = self.dir / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- helpers ----------------------------------------------------------------------------

    def _ok(self, *args: str) -> bool:
        try:
            self.ceph(*args, timeout=10)
        except (subprocess.SubprocessError, OSError):
            return False
        return True

    def _until(self, ready: object, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + self.ready_seconds
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} was not ready within {self.ready_seconds:g} s:\n{self.log_tail()}"
                )
            for p in (self.mon, self.osd):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{what}: a daemon exited ({p.returncode}):\n{self.log_tail()}")
            time.sleep(0.3)

    def _logged(self, cmd: list[str], name: str, env: dict[str, str]) -> None:
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{self.log_tail()}")

    def _daemon(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.dir / "log" / f"{name}.out", "ab")  # noqa: SIM115 - the daemon's stdout
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            out.close()


@contextlib.contextmanager
def running_cluster(**kwargs: object) -> Iterator[CephCluster]:
    """A started ``CephCluster`` (keyword arguments as its), stopped and removed after."""
    cluster = CephCluster(**kwargs)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.stop()
