"""Where a repository's test command runs: in a bubblewrap sandbox (read-only root, the worktree and a
private /tmp writable, no network, no /run sockets, a minimal environment, no capabilities, limits on
CPU time, memory, processes and file size), or, only when asked or allowed, on the bare machine.
This module builds the command line and environment of a run; testrun.py starts, reads and kills it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ds4.agent.errors import SandboxError

# Not secret, and needed by toolchains; everything else (API keys, DS4_*, tokens) stays outside.
KEPT_ENV = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV", "PYTHONPATH", "GOPATH", "GOMODCACHE",
    "GOROOT", "GOFLAGS", "CARGO_HOME", "RUSTUP_HOME", "JAVA_HOME", "NODE_PATH", "PYENV_ROOT", "PYENV_VERSION",
)  # fmt: skip
# Toolchains found under the user's home by default; the run's own home is private, so they are named.
TOOLCHAIN_HOMES = {"RUSTUP_HOME": ".rustup", "CARGO_HOME": ".cargo", "PYENV_ROOT": ".pyenv", "GOPATH": "go"}
# Under the user's home: credentials a test could copy into its diff. Covered by empty mounts.
SECRET_HOME_PATHS = (".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config", ".netrc", ".pypirc")
# Sockets of the host's daemons (docker, dbus) live here and a network namespace does not hide them.
HIDDEN_SYSTEM_PATHS = ("/run", "/var/run")
NO_SANDBOX_HELP = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"


@dataclass(frozen=True)
class Limits:
    """Per test run. The process limit is RLIMIT_NPROC, which the kernel does not apply to root: there
    a cgroup of the run's own bounds it (cgroup.py)."""

    cpu_seconds: int = 3600
    memory_bytes: int = 16 << 30  # address space: runtimes reserve far more than they touch
    processes: int = 4096
    file_bytes: int = 4 << 30
    output_bytes: int = 8 << 20  # what the runner keeps of the output (head and tail)


class Sandbox(Protocol):
    """A way to run a test command: the argv and environment for one run in `tree`, given a fresh
    private folder `scratch` (its /tmp and home) that the caller removes afterwards."""

    name: str
    limits: Limits

    def prepare(self, command: str, tree: Path, scratch: Path) -> tuple[list[str], dict[str, str]]: ...


def environment(home: str, tmp: str) -> dict[str, str]:
    """The minimal environment of a test run: a few toolchain variables, a private home and tmp."""
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    for name, folder in TOOLCHAIN_HOMES.items():
        default = os.path.join(os.path.expanduser("~"), folder)
        if name not in env and os.path.isdir(default):
            env[name] = default  # read-only in the sandbox: what is installed, nothing downloaded
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    return env | {"HOME": home, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1", "CI": "1"}


def limited(argv: list[str], limits: Limits) -> list[str]:
    """argv under `prlimit` (util-linux) with the limits set; unchanged where prlimit is missing."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return argv
    return [
        prlimit,
        f"--cpu={limits.cpu_seconds}",
        f"--as={limits.memory_bytes}",
        f"--nproc={limits.processes}",
        f"--fsize={limits.file_bytes}",
        "--core=0",
        "--",
        *argv,
    ]


@dataclass
class Bubblewrap:
    """bubblewrap: the host's root read-only, `hidden` paths (and credentials under the home, and
    /run) covered, the worktree writable, /tmp private, no network, its own pid namespace (so the whole
    tree dies with it), no capabilities even as root, killed if the runner dies."""

    hidden: tuple[Path, ...] = ()
    limits: Limits = field(default_factory=Limits)
    name: str = "bubblewrap"

    def prepare(self, command: str, tree: Path, scratch: Path) -> tuple[list[str], dict[str, str]]:
        argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for path in self._covered():
            argv += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", os.devnull, str(path)]
        argv += ["--bind", str(scratch), "/tmp", "--dir", "/tmp/home"]
        for path in _toolchains_under_tmp():  # the private /tmp would hide them
            argv += ["--ro-bind", str(path), str(path)]
        argv += ["--bind", str(tree), str(tree)]
        argv += ["--chdir", str(tree), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--", "/bin/sh", "-c", command]
        return limited(argv, self.limits), environment("/tmp/home", "/tmp")

    def _covered(self) -> list[Path]:
        home = Path(os.path.expanduser("~"))
        paths = [*HIDDEN_SYSTEM_PATHS, *(home / p for p in SECRET_HOME_PATHS), *self.hidden]
        real = {Path(os.path.realpath(p)) for p in paths}
        return sorted(p for p in real if p.exists() and p != Path("/"))


def _toolchains_under_tmp() -> list[Path]:
    """This Python's environment and the PATH folders that live under /tmp (a checkout or venv there),
    outermost first and none inside another: read-only inside the sandbox, over its private /tmp."""
    tmp = Path(os.path.realpath("/tmp"))
    candidates = {sys.prefix, sys.base_prefix, *os.environ.get("PATH", "").split(os.pathsep)}
    found = sorted(
        {Path(os.path.realpath(c)) for c in candidates if c and os.path.isdir(c)},
        key=lambda p: len(p.parts),
    )
    kept: list[Path] = []
    for path in found:
        if path.is_relative_to(tmp) and path != tmp and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


@dataclass
class Unsandboxed:
    """The bare machine: the same minimal environment, limits and private tmp, but the test command
    sees the network and can write wherever the user can. Only by choice (--no-sandbox) or permission."""

    limits: Limits = field(default_factory=Limits)
    name: str = "none"

    def prepare(self, command: str, tree: Path, scratch: Path) -> tuple[list[str], dict[str, str]]:
        home = scratch / "home"
        home.mkdir(exist_ok=True)
        return limited(["/bin/sh", "-c", command], self.limits), environment(str(home), str(scratch))


@functools.cache
def bubblewrap_problem() -> str | None:
    """Why bubblewrap cannot sandbox here (missing, or its probe fails), or None when it can."""
    if sys.platform != "linux":
        return f"bubblewrap needs Linux, this is {sys.platform}"
    if shutil.which("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {NO_SANDBOX_HELP}"
    with tempfile.TemporaryDirectory(prefix="ds4-probe-") as folder:
        tree, scratch = Path(folder, "tree"), Path(folder, "scratch")
        tree.mkdir()
        scratch.mkdir()
        argv, env = Bubblewrap().prepare("echo ok > probe", tree, scratch)
        done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or not (tree / "probe").is_file():
            return f"bubblewrap is installed but cannot start a sandbox here: {done.stderr.strip()[:300]}"
    return None


@functools.cache
def _warn_once(message: str) -> None:
    print(f"ds4-agent: warning: {message}", file=sys.stderr, flush=True)


def choose(
    no_sandbox: bool = False,
    allow_unsandboxed: bool = True,
    hidden: tuple[Path, ...] = (),
    warn: Callable[[str], None] = _warn_once,
) -> Sandbox:
    """The sandbox for test runs: bubblewrap where it works; otherwise the bare machine when
    `allow_unsandboxed` (said once through `warn`), else SandboxError. `no_sandbox` opts out, loudly."""
    if no_sandbox:
        warn("tests run WITHOUT a sandbox (--no-sandbox): a repository's tests reach your network and files")
        return Unsandboxed()
    problem = bubblewrap_problem()
    if problem is None:
        return Bubblewrap(hidden=tuple(hidden))
    if not allow_unsandboxed:
        raise SandboxError(f"no sandbox for test commands: {problem}")
    warn(f"no sandbox for test commands ({problem}); they run unsandboxed")
    return Unsandboxed()
