"""Test-suite plumbing: tests under tests/vm run inside the test VM against the real kernel.

On a host without VDUSE, every collected VM test is replaced by one proxy per test kernel
(Linux 6.12 and 7.3 unless --kernel or $PYVDUSE_TESTVM_KERNEL names one; with several, each
proxy's name ends in the kernel, like ``test_x[linux7.3]``). When the run starts, one
background thread per kernel boots that kernel's VM and runs all the selected VM tests there
with pytest (the checkout is shared into the guest), while the host tests run here: the two
guests run side by side, which is what keeps both kernels within CI's hour. Each proxy then
reports its own test's outcome from its guest's JUnit XML, so a failure in the guest shows
up here under the test's own name, with the guest's message. The tests that boot a VM of
their own run last, once the guests have given back the machine's two VM slots. Inside the
VM (PYVDUSE_IN_VM=1) the tests simply run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_VM = os.environ.get("PYVDUSE_IN_VM") == "1"
RESULTS = ROOT / ".vm-results"
# All VM tests of one kernel share one guest: about 25 minutes alone on an idle 2-core machine,
# 31-32 each with both kernels side by side; leave room for a loaded one (CI has an hour).
VM_TIMEOUT = float(os.environ.get("PYVDUSE_VM_TIMEOUT", "3600"))
# pytest-timeout's limits beyond the default of pyproject.toml (600 s, for the host tests):
# a VM test inside the guest (TCG is slow: the longest take minutes), and on the host the
# first VM proxy, which runs the whole guest session (bounded by VM_TIMEOUT itself, plus
# building the guest image and booting), and the tests that boot a VM of their own.
VM_TEST_TIMEOUT = float(os.environ.get("PYVDUSE_VM_TEST_TIMEOUT", "1800"))
VM_SESSION_TIMEOUT = VM_TIMEOUT + 1800


def pytest_configure(config: pytest.Config) -> None:
    """Before collection, what the tests need that a fresh machine lacks (it has Python and
    nothing else): the commands they run (fio, nbdkit, ...; the unit tests run some too),
    and the native data path, built when the install could not (no C compiler); see
    testvm.ensure_test_tools and ensure_native_build. PYVDUSE_NO_INSTALL=1: none of that
    (fuzz/sanitize.sh installs first, then runs the suite under the sanitizer's preload,
    where apt and pip must not run)."""
    if IN_VM or os.environ.get("PYVDUSE_NO_INSTALL") == "1":
        return  # the guest sees the host's filesystem and checkout
    from pyvduse import testvm

    kernel = config.getoption("--kernel")
    if kernel is not None:  # also for the tests that boot a VM of their own (boots_vm)
        os.environ["PYVDUSE_TESTVM_KERNEL"] = kernel

    for ensure in (testvm.ensure_test_tools, lambda: testvm.ensure_native_build(ROOT)):
        try:
            ensure()
        except testvm.TestVMError as e:
            sys.stderr.write(f"\n[tests] {e}\n")


def pytest_addoption(parser: pytest.Parser) -> None:
    from pyvduse.testvm import DEFAULT_KERNEL, KERNELS

    parser.addoption(
        "--no-vm",
        action="store_true",
        help="skip every test that needs the test VM (real kernel, or a VM it boots itself)",
    )
    parser.addoption(
        "--kernel",
        choices=list(KERNELS),
        default=None,
        help="run the VM tests on this Linux only (default: on every test kernel, "
        f"{', '.join(KERNELS)}, unless $PYVDUSE_TESTVM_KERNEL names one; the tests that boot "
        f"a VM of their own boot {DEFAULT_KERNEL}); 7.3 speaks VDUSE API version 1",
    )


@dataclass
class GuestOutcome:
    outcome: str  # passed, failed, skipped
    message: str = ""


class VmSession:
    """One kernel's VM run, shared by that kernel's proxies: started in a thread of its own
    when the run starts (start), waited for by the first proxy (ensure)."""

    def __init__(self, nodeids: list[str], kernel: str) -> None:
        self.nodeids = nodeids
        self.kernel = kernel
        self.results: dict[str, GuestOutcome] | None = None
        self.error = ""
        self.console = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"vm-{self.kernel}", daemon=True)
            self._thread.start()

    def ensure(self) -> None:
        self.start()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        from pyvduse import testvm

        RESULTS.mkdir(exist_ok=True)
        tag = f"{os.getpid()}-{self.kernel}"
        junit = RESULTS / f"junit-{tag}.xml"
        junit.unlink(missing_ok=True)
        args = " ".join(f"'{n}'" for n in self.nodeids)
        command = (
            f"{sys.executable} -m pytest -p no:cacheprovider -v -rfEs --durations=20 "
            f"--junitxml={junit} {args}"
        )
        live = RESULTS / f"console-{tag}.log"  # tail -f it while the VM runs
        sys.stderr.write(
            f"\n[vm] running {len(self.nodeids)} test(s) in the Linux {self.kernel} test VM; "
            f"console: {live}\n"
        )
        try:
            with live.open("w") as console:
                result = testvm.run(
                    command, cwd=str(ROOT), timeout=VM_TIMEOUT, console=console, kernel=self.kernel
                )
        except Exception as e:  # no root, no qemu, no kernel package...
            self.error = f"the Linux {self.kernel} test VM could not run: {e}"
            return
        self.console = result.output
        (RESULTS / f"kernel-{tag}.log").write_text(result.kernel_log)
        if not junit.exists():
            self.error = (
                f"the Linux {self.kernel} guest produced no results (exit {result.exit_code}"
                f"{', timed out' if result.timed_out else ''}); console tail:\n" + result.output[-3000:]
            )
            return
        self.results = parse_junit(junit)


def vm_kernels() -> list[str]:
    """The kernels the VM tests run on: --kernel's or $PYVDUSE_TESTVM_KERNEL's, else all."""
    from pyvduse.testvm import KERNELS

    chosen = os.environ.get("PYVDUSE_TESTVM_KERNEL")
    return [chosen] if chosen else list(KERNELS)


def parse_junit(path: Path) -> dict[str, GuestOutcome]:
    out: dict[str, GuestOutcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        parts = classname.split(".")
        module = "/".join(parts[:-1] if parts and parts[-1][:1].isupper() else parts)
        cls = parts[-1] if parts and parts[-1][:1].isupper() else None
        nodeid = f"{module}.py::" + (f"{cls}::" if cls else "") + name
        outcome = GuestOutcome("passed")
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                outcome = GuestOutcome("failed", (el.get("message", "") + "\n" + (el.text or "")))
        el = case.find("skipped")
        if el is not None and outcome.outcome == "passed":
            outcome = GuestOutcome("skipped", el.get("message", ""))
        out[nodeid] = outcome
    return out


class GuestFailure(Exception):
    pass


class VmProxyItem(pytest.Item):
    """Stands for one VM test on the host and reports what it did in the guest."""

    def __init__(self, *, session_ref: VmSession, original: pytest.Item, **kw: Any) -> None:
        super().__init__(**kw)
        self.vm = session_ref
        self.original = original
        self.own_markers = list(original.own_markers)

    def runtest(self) -> None:
        self.vm.ensure()
        if self.vm.error:
            raise GuestFailure(self.vm.error)
        assert self.vm.results is not None
        res = self.vm.results.get(self.original.nodeid)
        if res is None:
            raise GuestFailure("did not run in the guest; console tail:\n" + self.vm.console[-2000:])
        if res.outcome == "skipped":
            pytest.skip(f"in the VM: {res.message}")
        if res.outcome == "failed":
            raise GuestFailure(res.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return f"[in the Linux {self.vm.kernel} test VM] {excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: boot the VM for the selected tests only
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    vm_items = [i for i in items if i.get_closest_marker("vm") is not None]
    for i in items:
        if i.get_closest_marker("timeout") is None and i.get_closest_marker("boots_vm") is not None:
            i.add_marker(pytest.mark.timeout(VM_SESSION_TIMEOUT))
        elif i.get_closest_marker("timeout") is None and i.get_closest_marker("vm") is not None:
            i.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT if IN_VM else VM_SESSION_TIMEOUT))
    if config.getoption("--no-vm"):
        skip = pytest.mark.skip(reason="--no-vm given")
        for i in items:
            if i.get_closest_marker("vm") is not None or i.get_closest_marker("boots_vm") is not None:
                i.add_marker(skip)
        return
    if not vm_items:
        return
    if IN_VM:
        if not Path("/dev/vduse/control").exists():
            skip = pytest.mark.skip(reason="no /dev/vduse/control in this VM")
            for i in vm_items:
                i.add_marker(skip)
        return
    kernels = vm_kernels()
    nodeids = [i.nodeid for i in vm_items]
    sessions = [VmSession(nodeids, k) for k in kernels]
    config.stash[VM_SESSIONS] = sessions
    host: list[pytest.Item] = []
    own_vm: list[pytest.Item] = []
    proxies: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker("vm") is None:
            (own_vm if item.get_closest_marker("boots_vm") else host).append(item)
    for vm in sessions:  # one kernel's proxies together: its results show as it ends
        for item in vm_items:
            assert item.parent is not None
            name = item.name
            if len(sessions) > 1:  # test_x[linux7.3], test_x[native-linux7.3]
                tag = "linux" + vm.kernel
                name = name[:-1] + f"-{tag}]" if name.endswith("]") else f"{name}[{tag}]"
            proxies.append(VmProxyItem.from_parent(item.parent, name=name, session_ref=vm, original=item))
    # the guests hold both VM slots while they run: a test that boots its own VM goes last
    items[:] = host + proxies + own_vm


VM_SESSIONS = pytest.StashKey[list[VmSession]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[None]:
    """Boot every kernel's guest as the run starts, so they run beside the host tests."""
    if not session.config.option.collectonly:
        from pyvduse import testvm

        with contextlib.suppress(testvm.TestVMError):  # each session reports it
            testvm.ensure_tools()  # once here, not in two threads at once (apt)
        for vm in session.config.stash.get(VM_SESSIONS, []):
            vm.start()
    yield
