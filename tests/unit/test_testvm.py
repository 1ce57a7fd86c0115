"""Tests for the test-VM harness: everything but the boot runs without QEMU or root."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyvduse import testvm
from pyvduse.testvm import (
    DONE_MARKER,
    EXIT_NO_STATUS,
    EXIT_TIMEOUT,
    INIT_SCRIPT,
    KMSG_START,
    READY_MARKER,
    ConsoleFilter,
    RunResult,
)

# --------------------------------------------------------------------------- command script


def test_command_script_sets_env_and_cwd_and_keeps_exit_status(tmp_path: Path) -> None:
    env = testvm.guest_env({"EXTRA": "x y'z $HOME"})
    script = testvm.command_script("pwd; env; exit 5", cwd=str(tmp_path), env=env)
    path = tmp_path / "command.sh"
    path.write_text(script)
    # The guest init runs it exactly like this: empty environment, bash, no stdin.
    proc = subprocess.run(["env", "-i", "/bin/bash", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(tmp_path)
    got = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert got["PYVDUSE_IN_VM"] == "1"
    assert got["HOME"] == "/root"
    assert got["EXTRA"] == "x y'z $HOME"
    assert got["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert "/usr/bin" in got["PATH"].split(":")


def test_command_script_fails_when_cwd_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "command.sh"
    path.write_text(testvm.command_script("echo ran", cwd=str(tmp_path / "nope"), env={}))
    proc = subprocess.run(["/bin/bash", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "ran" not in proc.stdout


def test_command_script_rejects_bad_env_names() -> None:
    with pytest.raises(ValueError, match="environment variable"):
        testvm.command_script("true", cwd="/", env={"A B": "1"})


def test_guest_env_defaults_and_overrides() -> None:
    env = testvm.guest_env()
    assert env["PYVDUSE_IN_VM"] == "1" and env["HOME"] == "/root"
    assert env["PATH"].startswith(os.path.dirname(sys.executable) + ":")
    assert testvm.guest_env({"PATH": "/bin", "X": "1"})["PATH"] == "/bin"


def test_run_refuses_cwd_under_tmp_before_booting() -> None:
    # The guest mounts its own tmpfs on /tmp, so such a cwd can never exist in there.
    with pytest.raises(ValueError, match="/tmp"):
        testvm.run("true", cwd="/tmp/somewhere")


def test_join_command() -> None:
    assert testvm.join_command(["uname -r; ls /dev"]) == "uname -r; ls /dev"
    assert testvm.join_command(["echo", "a b", "$X"]) == "echo 'a b' '$X'"


# --------------------------------------------------------------------------- guest image


def test_pick_kernel_package_takes_the_newest_6_12_cloud_image() -> None:
    names = [
        "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
        "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        "linux-image-6.12.38+deb12-cloud-amd64-unsigned",
        "linux-image-6.12.117+deb12-amd64-unsigned",
        "linux-image-6.1.0-40-cloud-amd64-unsigned",
    ]
    assert testvm.pick_kernel_package(names) == "linux-image-6.12.117+deb12-cloud-amd64-unsigned"
    assert testvm.pick_kernel_package(["linux-image-amd64"]) is None


def test_pick_kernel_package_for_7_3_takes_the_newest_cloud_modules_package() -> None:
    k7 = testvm.KERNELS["7.3"]
    names = [
        "linux-modules-7.3.4+deb13-amd64",
        "linux-modules-7.3.4+deb13-cloud-amd64",
        "linux-modules-7.3.12+deb13-cloud-amd64",
        "linux-binary-7.3.20+deb13-cloud-amd64",
        "linux-modules-7.2.12+deb13-cloud-amd64",
    ]
    assert testvm.pick_kernel_package(names, k7) == "linux-modules-7.3.12+deb13-cloud-amd64"
    assert k7.packages("linux-modules-7.3.12+deb13-cloud-amd64") == [
        "linux-modules-7.3.12+deb13-cloud-amd64",
        "linux-binary-7.3.12+deb13-cloud-amd64",
    ]
    assert k7.apt_pattern == r"^linux-modules-7\.3\.([0-9]+)\+deb([0-9]+)-cloud-amd64$"
    assert testvm.KERNELS[testvm.DEFAULT_KERNEL].packages("x") == ["x"]


def test_a_kernel_of_its_own_suite_gets_a_private_apt_configuration(tmp_path: Path) -> None:
    assert testvm.apt_options(testvm.KERNELS["6.12"], tmp_path) == []  # the machine's sources
    opts = testvm.apt_options(testvm.KERNELS["7.3"], tmp_path)
    settings = dict(o.split("=", 1) for o in opts if o != "-o")
    apt = tmp_path / "apt"
    assert settings == {
        "Dir::Etc::SourceList": str(apt / "sources.list"),
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::State::Lists": str(apt / "lists"),
        "Dir::Cache": str(apt / "cache"),
    }
    assert (apt / "sources.list").read_text() == (
        f"deb [signed-by={testvm.DEBIAN_KEYRING}] {testvm.DEBIAN_MIRROR} trixie-backports main\n"
    )
    assert (apt / "lists" / "partial").is_dir() and (apt / "cache" / "archives" / "partial").is_dir()
    with pytest.raises(ValueError, match=r"choose one of 6\.12, 7\.3"):
        testvm.kernel_spec("5.10")


def _fake_ko(depends: str) -> bytes:
    return b"\x7fELF junk\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"


def test_module_load_order_puts_dependencies_first() -> None:
    modules = {
        "vduse": _fake_ko("vhost_iotlb,vdpa"),
        "vdpa": _fake_ko(""),
        "vhost_iotlb": _fake_ko(""),
        "vhost_vdpa": _fake_ko("vhost_iotlb,vdpa,vhost,irqbypass"),
        "vhost": _fake_ko("vhost_iotlb"),
        "irqbypass": _fake_ko(""),
    }
    order = testvm.module_load_order(["vduse", "vhost_vdpa"], modules)
    assert sorted(order) == sorted(modules)
    for name, ko in modules.items():
        for dep in testvm.module_depends(ko):
            assert order.index(dep) < order.index(name)
    # Built-in modules are neither needed nor loaded.
    assert testvm.module_load_order(["vduse"], modules, builtin={"vdpa"}) == ["vhost_iotlb", "vduse"]
    with pytest.raises(testvm.TestVMError, match="no module"):
        testvm.module_load_order(["vduse"], {"vduse": _fake_ko("vdpa")})


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal independent newc reader: name -> (mode, data, (rdevmajor, rdevminor))."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_initrd_contents() -> None:
    mods = [("vdpa", b"VDPA-KO"), ("vduse", b"VDUSE-KO")]
    initrd = testvm.build_initrd(b"BUSYBOX", mods)
    raw = gzip.decompress(initrd)
    files = _read_newc(raw)
    assert files["init"][1] == INIT_SCRIPT.encode()
    assert files["init"][0] & 0o111 and stat.S_ISREG(files["init"][0])
    assert files["bin/busybox"][1] == b"BUSYBOX" and files["bin/busybox"][0] & 0o111
    assert stat.S_ISCHR(files["dev/console"][0]) and files["dev/console"][2] == (5, 1)
    for d in ("bin", "dev", "proc", "sys", "host", "mods"):
        assert stat.S_ISDIR(files[d][0])
    assert files["mods/vduse.ko"][1] == b"VDUSE-KO"
    assert files["mods/order"][1] == b"vdpa\nvduse\n"
    if shutil.which("cpio"):  # cross-check the format with an independent reader
        listing = subprocess.run(
            ["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True
        ).stdout.decode()
        assert set(listing.split()) == set(files)


def test_init_script_is_valid_shell() -> None:
    sh = shutil.which("busybox")
    argv = [sh, "sh", "-n"] if sh else ["/bin/sh", "-n"]
    proc = subprocess.run(argv, input=INIT_SCRIPT, text=True, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert INIT_SCRIPT.startswith("#!/bin/busybox sh\n")
    assert f"{testvm.CMDLINE_KEY}=" in INIT_SCRIPT


def test_recipe_key_follows_the_init_script(monkeypatch: pytest.MonkeyPatch) -> None:
    before = testvm.recipe_key()
    monkeypatch.setattr(testvm, "INIT_SCRIPT", INIT_SCRIPT + "# changed\n")
    assert testvm.recipe_key() != before


def _build_deb(root: Path, deb: Path) -> Path:
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-kernel\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: fake\n"
    )
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], capture_output=True, check=True)
    return deb


def _fake_kernel_deb(
    tmp_path: Path, kv: str = "6.12.99+deb12-cloud-amd64", split: bool = False
) -> list[Path]:
    """Tiny .debs laid out like Debian's kernel package (xz modules, modules.builtin), or
    with ``split`` like 7.3's two: the image under usr/lib/modules/RELEASE/, the modules
    (and no modules.builtin) in the other."""
    import lzma

    root = tmp_path / f"pkg-{kv}"
    image_root = tmp_path / f"img-{kv}" if split else root
    if split:
        (image_root / "usr" / "lib" / "modules" / kv).mkdir(parents=True)
        (image_root / "usr" / "lib" / "modules" / kv / "vmlinuz").write_bytes(b"KERNEL")
        mods = root / "usr" / "lib" / "modules" / kv / "kernel"
    else:
        (root / "boot").mkdir(parents=True)
        (root / "boot" / f"vmlinuz-{kv}").write_bytes(b"KERNEL")
        mods = root / "lib" / "modules" / kv / "kernel"
    for rel, deps in {
        "drivers/vdpa/vdpa_user/vduse": "vhost_iotlb,vdpa",
        "drivers/vdpa/vdpa": "",
        "drivers/vhost/vhost_iotlb": "",
        "drivers/net/unrelated": "",
    }.items():
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / f"{rel}.ko.xz").write_bytes(lzma.compress(_fake_ko(deps)))
    if not split:
        (root / "lib" / "modules" / kv / "modules.builtin").write_text("kernel/fs/fuse/virtiofs.ko\n")
        return [_build_deb(root, tmp_path / f"fake-{kv}.deb")]
    return [_build_deb(root, tmp_path / f"mods-{kv}.deb"), _build_deb(image_root, tmp_path / f"img-{kv}.deb")]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_ensure_guest_builds_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    (deb,) = _fake_kernel_deb(tmp_path)
    downloads: list[str] = []

    def fake_download(package: str, debs: Path, apt_opts: object = ()) -> Path:
        downloads.append(package)
        return deb

    monkeypatch.setattr(testvm, "GUEST_MODULES", ("vduse",))
    monkeypatch.setattr(testvm, "_search_kernel_package", lambda kernel, opts: "linux-image-fake")
    monkeypatch.setattr(testvm, "_download_deb", fake_download)
    monkeypatch.setattr(testvm, "_find_busybox", lambda: sys.executable)
    monkeypatch.setattr(testvm, "_note", lambda message: None)
    cache = tmp_path / "cache"
    images: list[testvm.GuestImage] = []
    threads = [threading.Thread(target=lambda: images.append(testvm.ensure_guest(cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(images) == 3 and len(set(images)) == 1
    assert downloads == ["linux-image-fake"]  # the lock made the others wait and reuse it
    image = images[0]
    assert image.kernel_release == "6.12.99+deb12-cloud-amd64"
    assert image.vmlinuz.read_bytes() == b"KERNEL"
    assert image.vmlinuz.parent == cache / "linux-6.12" / f"guest-{testvm.recipe_key()}"
    files = _read_newc(gzip.decompress(image.initrd.read_bytes()))
    assert files["mods/order"][1] == b"vhost_iotlb\nvdpa\nvduse\n"
    assert files["mods/vduse.ko"][1] == _fake_ko("vhost_iotlb,vdpa")
    assert "mods/unrelated.ko" not in files
    assert testvm.ensure_guest(cache) == image and len(downloads) == 1
    # A new init means a new image.
    monkeypatch.setattr(testvm, "INIT_SCRIPT", INIT_SCRIPT + "# v2\n")
    assert testvm.ensure_guest(cache).vmlinuz.parent != image.vmlinuz.parent
    assert len(downloads) == 2


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_ensure_guest_7_3_uses_both_packages_through_its_own_apt_in_its_own_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = "7.3.4+deb13-cloud-amd64"
    mods_deb, image_deb = _fake_kernel_deb(tmp_path, kv, split=True)
    searched: list[tuple[str, list[str]]] = []
    downloads: list[tuple[str, Path]] = []

    def fake_search(kernel: testvm.KernelSpec, opts: list[str]) -> str:
        searched.append((kernel.version, opts))
        return f"linux-modules-{kv}"

    def fake_download(package: str, debs: Path, apt_opts: object = ()) -> Path:
        downloads.append((package, debs))
        return mods_deb if package.startswith("linux-modules-") else image_deb

    monkeypatch.setattr(testvm, "GUEST_MODULES", ("vduse",))
    monkeypatch.setattr(testvm, "_search_kernel_package", fake_search)
    monkeypatch.setattr(testvm, "_download_deb", fake_download)
    monkeypatch.setattr(testvm, "_keep_only", lambda debs, wanted: None)
    monkeypatch.setattr(testvm, "_find_busybox", lambda: sys.executable)
    monkeypatch.setattr(testvm, "_note", lambda message: None)
    cache = tmp_path / "cache"
    image = testvm.ensure_guest(cache, kernel="7.3")
    assert (image.kernel_release, image.vmlinuz.read_bytes()) == (kv, b"KERNEL")
    assert image.vmlinuz.parent.parent == cache / "linux-7.3"
    assert (
        searched[0][0] == "7.3"
        and f"Dir::State::Lists={cache / 'linux-7.3' / 'apt' / 'lists'}" in searched[0][1]
    )
    assert downloads == [
        (f"linux-modules-{kv}", cache / "linux-7.3" / "debs"),
        (f"linux-binary-{kv}", cache / "linux-7.3" / "debs"),
    ]
    files = _read_newc(gzip.decompress(image.initrd.read_bytes()))
    assert files["mods/order"][1] == b"vhost_iotlb\nvdpa\nvduse\n"
    assert testvm.ensure_guest(cache, kernel="7.3") == image and len(downloads) == 2


def test_ensure_tools_tells_a_non_root_user_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testvm, "_missing_tools", lambda: ["virtiofsd", "qemu-system-x86_64"])
    monkeypatch.setattr(testvm, "_is_root", lambda: False)
    with pytest.raises(testvm.TestVMError, match=r"apt-get install -y qemu-system-x86 .*busybox-static"):
        testvm.ensure_tools()


def test_ensure_tools_installs_as_root_updating_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    missing = [["vdpa"], []]
    monkeypatch.setattr(testvm, "_missing_tools", lambda: missing.pop(0))
    monkeypatch.setattr(testvm, "_is_root", lambda: True)
    monkeypatch.setattr(testvm, "_apt", lambda *args: calls.append(args))
    monkeypatch.setattr(testvm, "_note", lambda message: None)
    monkeypatch.setattr(testvm, "find_virtiofsd", lambda: "/usr/lib/qemu/virtiofsd")
    monkeypatch.setattr(testvm, "_find_busybox", lambda: "/bin/busybox")
    monkeypatch.setattr(testvm, "_which", lambda name: f"/usr/bin/{name}")
    tools = testvm.ensure_tools()
    assert calls[0][0] == "update" and calls[1][:2] == ("install", "-y")
    assert set(testvm.APT_PACKAGES) <= set(calls[1])
    assert tools.virtiofsd == "/usr/lib/qemu/virtiofsd"


def test_ensure_tools_does_nothing_when_all_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testvm, "_missing_tools", lambda: [])
    monkeypatch.setattr(testvm, "_apt", lambda *args: pytest.fail("apt must not run"))
    monkeypatch.setattr(testvm, "find_virtiofsd", lambda: "/v")
    monkeypatch.setattr(testvm, "_find_busybox", lambda: "/b")
    monkeypatch.setattr(testvm, "_which", lambda name: f"/usr/bin/{name}")
    assert testvm.ensure_tools() == testvm.HostTools("/usr/bin/qemu-system-x86_64", "/v", "/b")


def test_is_static_elf(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not testvm.is_static_elf(str(tmp_path / "script"))
    assert not testvm.is_static_elf(str(tmp_path / "missing"))
    assert not testvm.is_static_elf("/bin/bash")  # dynamically linked on Debian


def test_virtiofsd_argv_knows_both_flavours(tmp_path: Path) -> None:
    rust = tmp_path / "rust-virtiofsd"
    rust.write_text("#!/bin/sh\necho '  --shared-dir <DIR>  Shared directory path'\n")
    rust.chmod(0o755)
    sock = tmp_path / "s.sock"
    assert "--shared-dir=/" in testvm.virtiofsd_argv(str(rust), sock)
    c = tmp_path / "c-virtiofsd"
    c.write_text("#!/bin/sh\necho '-o source=PATH'\n")
    c.chmod(0o755)
    assert testvm.virtiofsd_argv(str(c), sock)[-6:] == [
        "-o", "source=/", "-o", "cache=always", "-o", "sandbox=chroot",
    ]  # fmt: skip
    # the second share: a directory of the run's, uncached (FUSE direct-I/O mode)
    assert testvm.virtiofsd_argv(str(rust), sock, "/r/nocache", "none")[2:4] == [
        "--shared-dir=/r/nocache",
        "--cache=never",
    ]
    assert testvm.virtiofsd_argv(str(c), sock, "/r/nocache", "none")[-6:] == [
        "-o", "source=/r/nocache", "-o", "cache=none", "-o", "sandbox=chroot",
    ]  # fmt: skip


def test_the_guest_gets_a_cache_none_share(tmp_path: Path) -> None:
    image = testvm.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd", "6.12", "pkg")
    argv = testvm.qemu_argv(
        "qemu", image, tmp_path / "a.sock", tmp_path, mem="1G", smp=1, nocache_socket=tmp_path / "b.sock"
    )
    assert f"vhost-user-fs-pci,chardev=vfs2,tag={testvm.NOCACHE_TAG}" in argv
    assert f"socket,id=vfs2,path={tmp_path / 'b.sock'}" in argv
    assert f"mount -t virtiofs {testvm.NOCACHE_TAG} /host{testvm.NOCACHE_MOUNT}" in INIT_SCRIPT
    assert testvm.guest_env()["PYVDUSE_VM_NOCACHE_DIR"] == testvm.NOCACHE_MOUNT


# --------------------------------------------------------------------------- console


def _console(token: str, body: str) -> str:
    """What the serial line carries: CRLF line ends, boot noise, markers, power-off."""
    text = (
        "[    0.9] some early error\n"
        f"\n{READY_MARKER} {token}\n"
        f"{body}"
        f"\n{DONE_MARKER} {token}\n"
        "[    3.1] reboot: Power down\n"
    )
    return text.replace("\n", "\r\n")


@pytest.mark.parametrize("body", ["hello\nworld\n", "no newline", "", "a\r\n\rprogress\n"])
def test_console_filter_any_chunking(body: str) -> None:
    raw = _console("rtok", body)  # the serial line turns each LF the command wrote into CRLF
    for size in (1, 2, 3, 7, len(raw)):
        sink = io.StringIO()
        f = ConsoleFilter("rtok", sink)
        for i in range(0, len(raw), size):
            f.feed(raw[i : i + size])
        f.close()
        assert f.output == body, size  # exactly what the command wrote
        assert sink.getvalue() == f.output


def test_console_filter_ignores_markers_of_other_runs() -> None:
    f = ConsoleFilter("rmine")
    f.feed(f"\n{READY_MARKER} rmine\nout\n{DONE_MARKER} rother\nmore\n")
    f.close()
    assert f.output == f"out\n{DONE_MARKER} rother\nmore\n"


def test_console_filter_shows_boot_text_when_never_ready() -> None:
    sink = io.StringIO()
    f = ConsoleFilter("rtok", sink)
    f.feed("Kernel panic - not syncing: VFS\r\n")
    assert sink.getvalue() == ""  # boot noise is held back while booting
    f.close()
    assert f.output == sink.getvalue() == "Kernel panic - not syncing: VFS\n"


def test_command_kernel_log() -> None:
    log = f"[0.1] boot\n[2.0] {KMSG_START}\n[2.5] vduse: oops\n"
    r = RunResult(exit_code=0, output="", kernel_log=log, timed_out=False, duration=1.0)
    assert r.command_kernel_log == "[2.5] vduse: oops\n"


# --------------------------------------------------------------------------- driving a fake qemu

FAKE_QEMU = textwrap.dedent(
    """
    import os, sys, time
    rundir, mode = sys.argv[1], sys.argv[2]
    token = os.path.basename(rundir)
    open(os.path.join(rundir, "pid"), "w").write(str(os.getpid()))
    out = sys.stdout
    boots = os.path.join(rundir, "boots")
    n = int(open(boots).read()) + 1 if os.path.exists(boots) else 1
    open(boots, "w").write(str(n))
    if mode == "panic" or (mode == "panic-once" and n == 1):
        out.write("[ 0.6] ? text_poke_early+0x6a/0xa0\\r\\n"
                  "[ 0.6] Kernel panic - not syncing: Attempted to kill the idle task!\\r\\n")
        sys.exit(0)
    if mode == "boot-hang" or (mode == "boot-hang-once" and n == 1):
        out.write("[ 0.6] stuck somewhere in the boot\\r\\n")
        out.flush()
        time.sleep(120)
    if mode in ("panic-once", "boot-hang-once"):
        mode = "ok"
    out.write("[ 0.5] boot noise\\r\\n\\r\\n{ready} " + token + "\\r\\n")
    out.write("hello-from-fake\\r\\n")
    out.flush()
    if mode == "hang":
        time.sleep(120)
    if mode == "ok":
        open(os.path.join(rundir, "kernel.log"), "w").write("[ 0.0] Linux version 6.12\\n")
        open(os.path.join(rundir, "status"), "w").write("3\\n")
        out.write("\\r\\n{done} " + token + "\\r\\n[ 2.0] reboot: Power down\\r\\n")
    """
).format(ready=READY_MARKER, done=DONE_MARKER)


@pytest.fixture
def fake_qemu(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    rundir = tmp_path / "rfake123"
    rundir.mkdir()
    return script, rundir


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_run_prepared_reads_status_and_kernel_log(fake_qemu: tuple[Path, Path]) -> None:
    script, rundir = fake_qemu
    sink = io.StringIO()
    argv = [sys.executable, str(script), str(rundir), "ok"]
    r = testvm._run_prepared(argv, rundir, timeout=60, console=sink)
    assert (r.exit_code, r.timed_out) == (3, False)
    assert r.output == "hello-from-fake\n" == sink.getvalue()
    assert r.kernel_log.startswith("[ 0.0] Linux version")


def test_run_prepared_without_status(fake_qemu: tuple[Path, Path]) -> None:
    script, rundir = fake_qemu
    r = testvm._run_prepared(
        [sys.executable, str(script), str(rundir), "crash"], rundir, timeout=60, console=None
    )
    assert (r.exit_code, r.timed_out, r.kernel_log) == (EXIT_NO_STATUS, False, "")
    assert "hello-from-fake" in r.output


def test_run_prepared_timeout_kills_the_vm(fake_qemu: tuple[Path, Path]) -> None:
    script, rundir = fake_qemu
    sink = io.StringIO()
    argv = [sys.executable, str(script), str(rundir), "hang"]
    r = testvm._run_prepared(argv, rundir, timeout=2.0, console=sink)
    assert (r.exit_code, r.timed_out) == (EXIT_TIMEOUT, True)  # the timeout ended it ...
    assert "hello-from-fake" in sink.getvalue()
    assert _pid_gone(int((rundir / "pid").read_text()))  # ... by killing the VM that hangs


def test_run_prepared_hides_a_panicked_boot_only_when_retrying(fake_qemu: tuple[Path, Path]) -> None:
    script, rundir = fake_qemu
    argv = [sys.executable, str(script), str(rundir), "panic"]
    sink = io.StringIO()
    r = testvm._run_prepared(argv, rundir, timeout=60, console=sink, will_retry=True)
    assert (r.exit_code, sink.getvalue(), r.output) == (EXIT_NO_STATUS, "", "")
    assert "Kernel panic" in r.boot_panic
    r = testvm._run_prepared(argv, rundir, timeout=60, console=sink, will_retry=False)
    assert "Kernel panic" in sink.getvalue() and "Kernel panic" in r.output


@pytest.fixture
def fake_vm(fake_qemu: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """run() with the fake qemu in place of qemu + virtiofsd; the mode goes in PYVDUSE_FAKE_MODE."""
    script, _ = fake_qemu
    monkeypatch.setattr(testvm, "RUN_BASE", tmp_path / "runs")
    monkeypatch.setattr(testvm, "_is_root", lambda: True)
    monkeypatch.setattr(testvm, "ensure_tools", lambda: testvm.HostTools("qemu", "virtiofsd", "busybox"))
    image = testvm.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd", "6.12", "pkg")
    monkeypatch.setattr(testvm, "ensure_guest", lambda kernel: image)
    monkeypatch.setattr(testvm, "_virtiofsd", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(
        testvm, "qemu_argv",
        lambda qemu, image, socket, rundir, **kw: [sys.executable, str(script), str(rundir),
                                                   os.environ["PYVDUSE_FAKE_MODE"]],
    )  # fmt: skip
    return tmp_path


def test_run_boots_again_after_a_boot_panic(
    fake_vm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYVDUSE_FAKE_MODE", "panic-once")
    sink = io.StringIO()
    r = testvm.run("true", cwd="/", console=sink)
    assert (r.exit_code, r.boots, r.boot_panic) == (3, 2, "")
    assert sink.getvalue() == "hello-from-fake\n"  # the failed boot is not in the output
    assert "booting again (2 of 3): Kernel panic - not syncing: Attempted to kill" in capsys.readouterr().err


def test_run_gives_up_after_boot_attempts(fake_vm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVDUSE_FAKE_MODE", "panic")
    sink = io.StringIO()
    r = testvm.run("true", cwd="/", console=sink)
    assert (r.exit_code, r.boots) == (EXIT_NO_STATUS, testvm.BOOT_ATTEMPTS)
    assert sink.getvalue().count("Kernel panic") == 1  # only the last boot is shown


def test_run_prepared_stops_a_boot_that_hangs(fake_qemu: tuple[Path, Path]) -> None:
    script, rundir = fake_qemu
    argv = [sys.executable, str(script), str(rundir), "boot-hang"]
    sink = io.StringIO()
    r = testvm._run_prepared(argv, rundir, timeout=60, console=sink, will_retry=True, boot_timeout=1.0)
    assert (r.exit_code, r.timed_out, r.boot_hung, sink.getvalue()) == (EXIT_NO_STATUS, False, True, "")
    # the boot timeout ended it (boot_hung, not timed_out), and the VM was killed
    assert _pid_gone(int((rundir / "pid").read_text()))


def test_run_boots_again_after_a_boot_hang(
    fake_vm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYVDUSE_FAKE_MODE", "boot-hang-once")
    monkeypatch.setattr(testvm, "BOOT_TIMEOUT", 1.0)
    sink = io.StringIO()
    r = testvm.run("true", cwd="/", console=sink)
    assert (r.exit_code, r.boots, r.boot_hung) == (3, 2, False)
    assert sink.getvalue() == "hello-from-fake\n"  # the hung boot is not in the output
    assert "did not reach the command in 1 s of booting; booting again (2 of 3)" in capsys.readouterr().err


def test_run_does_not_retry_a_command_that_began(fake_vm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVDUSE_FAKE_MODE", "crash")  # ready marker, then no status
    r = testvm.run("true", cwd="/")
    assert (r.exit_code, r.boots) == (EXIT_NO_STATUS, 1)


# --------------------------------------------------------------------------- CLI


def test_main_passes_options_and_returns_the_guest_status(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(command: str, **kwargs: object) -> RunResult:
        seen.update(kwargs, command=command)
        return RunResult(exit_code=7, output="", kernel_log="", timed_out=False, duration=0.1)

    monkeypatch.setattr(testvm, "run", fake_run)
    argv = ["--mem", "1G", "--smp", "1", "--timeout", "30", "--cwd", "/", "--", "echo", "a b"]
    assert testvm.main(argv) == 7
    assert seen["command"] == "echo 'a b'"
    assert (seen["mem"], seen["smp"], seen["timeout"], seen["cwd"]) == ("1G", 1, 30.0, "/")
    assert seen["console"] is sys.stdout
    assert seen["kernel"] == testvm.DEFAULT_KERNEL
    assert testvm.main(["--kernel", "7.3", "--", "uname -r; ls"]) == 7
    assert seen.get("command") == "uname -r; ls"  # one word: shell code as is
    assert seen["kernel"] == "7.3"


def test_run_tells_the_command_its_kernel(fake_vm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts: list[str] = []
    monkeypatch.setattr(testvm, "_run_in_slot", lambda script, *a, **kw: scripts.append(script))
    testvm.run("true", cwd="/", kernel="7.3")
    monkeypatch.setenv("PYVDUSE_TESTVM_KERNEL", "7.3")
    testvm.run("true", cwd="/")
    monkeypatch.delenv("PYVDUSE_TESTVM_KERNEL")
    testvm.run("true", cwd="/")
    kernels = [line for script in scripts for line in script.splitlines() if "PYVDUSE_VM_KERNEL" in line]
    assert kernels == ["export PYVDUSE_VM_KERNEL=7.3"] * 2 + ["export PYVDUSE_VM_KERNEL=6.12"]


def test_main_without_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as e:
        testvm.main([])
    assert e.value.code == 2


# --------------------------------------------------------------------------- the real thing


@pytest.mark.boots_vm
@pytest.mark.skipif(os.geteuid() != 0, reason="the test VM needs root (virtiofsd)")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the guest kernel is amd64")
@pytest.mark.skipif(os.environ.get("PYVDUSE_IN_VM") == "1", reason="no VM inside the VM")
def test_vm_boots_with_vduse_and_reports_exit_status() -> None:
    r = testvm.run("test -e /dev/vduse/control && echo hello-from-guest && exit 3", cwd="/", timeout=600)
    assert not r.timed_out, r.output
    assert r.exit_code == 3, (r.output, r.kernel_log[-3000:])
    assert "hello-from-guest" in r.output
    assert r.kernel_log


# --------------------------------------------------------------------------- VM slots


def test_vm_slots_bound_the_vms_running_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    monkeypatch.setattr(testvm, "RUN_BASE", tmp_path)
    notes: list[str] = []
    monkeypatch.setattr(testvm, "_note", notes.append)
    inside = 0
    most = 0
    lock = threading.Lock()

    def one_vm() -> None:
        nonlocal inside, most
        with testvm._vm_slot(slots=2, poll=0.01):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=one_vm) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 2
    assert notes and "waiting" in notes[0]


def test_the_native_build_is_made_for_the_tests_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine's ``pip install`` has no C compiler: as root, the harness installs
    what the build takes and reinstalls the checkout in place; without root it says how."""
    calls: list[tuple[str, ...]] = []
    runs: list[list[str]] = []
    built = [False, False, True, True]
    notes: list[str] = []
    monkeypatch.delenv("PYVDUSE_NO_NATIVE", raising=False)
    monkeypatch.setattr(testvm, "native_built", lambda: built.pop(0))
    monkeypatch.setattr(testvm, "_apt", lambda *args: calls.append(args))
    monkeypatch.setattr(testvm, "_note", notes.append)

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(testvm, "_is_root", lambda: False)
    testvm.ensure_native_build(Path("/src/pyvduse"))
    assert not calls and not runs
    assert notes[-1].endswith(
        "apt-get install -y gcc libc6-dev python3-dev liburing-dev libnbd-dev && pip install -e /src/pyvduse"
    )
    monkeypatch.setattr(testvm, "_is_root", lambda: True)
    testvm.ensure_native_build(Path("/src/pyvduse"))
    assert calls[0][0] == "update" and set(testvm.BUILD_PACKAGES) <= set(calls[1])
    assert runs == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "/src/pyvduse"]]
    testvm.ensure_native_build(Path("/src/pyvduse"))  # built now: nothing more
    assert len(runs) == 1


def test_a_native_build_that_fails_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVDUSE_NO_NATIVE", raising=False)
    monkeypatch.setattr(testvm, "native_built", lambda: False)
    monkeypatch.setattr(testvm, "_is_root", lambda: True)
    monkeypatch.setattr(testvm, "_apt", lambda *args: None)
    monkeypatch.setattr(testvm, "_note", lambda message: None)
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "error: command 'gcc' failed"),
    )
    with pytest.raises(testvm.TestVMError, match=r"did not build the native data path:\n.*gcc' failed"):
        testvm.ensure_native_build(Path("/src/pyvduse"))
    monkeypatch.setenv("PYVDUSE_NO_NATIVE", "1")  # asked not to use it: nothing to build
    testvm.ensure_native_build(Path("/src/pyvduse"))


def test_the_quickstart_path_builds_the_native_engine_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pyvduse testvm -- bash examples/quickstart.sh``, the README's first command, on a
    machine whose ``pip install`` built no native engine: it is built before the guest
    boots (the guest runs our checkout), as the test command does."""
    order: list[str] = []
    monkeypatch.setattr(testvm, "ensure_native_build", lambda checkout: order.append(f"build {checkout}"))

    def run(command: str, **kw: object) -> object:
        order.append(f"run {command}")
        raise testvm.TestVMError("stop here")

    monkeypatch.setattr(testvm, "run", run)
    assert testvm.main(["--", "bash", "examples/quickstart.sh"]) == 2
    assert order == [f"build {testvm.source_checkout()}", "run bash examples/quickstart.sh"]
    assert testvm.source_checkout() == Path(testvm.__file__).resolve().parents[1]
