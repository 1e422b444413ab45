"""A throwaway PgBouncer in front of the test server (Debian's ``pgbouncer``; installed
with apt-get when missing and running as root, as on CI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_eventstore._tempcluster import free_port


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600
    )
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "pgbouncer"],
        env=env,
        check=False,
        capture_output=True,
        timeout=600,
    )
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )


@contextlib.contextmanager
def pgbouncer(server_url: str, *, pool_mode: str = "transaction") -> Iterator[str]:
    """Run PgBouncer in front of ``server_url``'s server; yields a URL template with
    ``{database}`` for the database name."""
    binary = pgbouncer_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed and could not be installed")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    server = urllib.parse.urlsplit(server_url)
    root = Path(tempfile.mkdtemp(prefix="trio-eventstore-pgbouncer-"))
    os.chmod(root, 0o755)
    port = free_port()
    user, password = server.username or "postgres", server.password or ""
    (root / "users.txt").write_text(f'"{user}" "{password}"\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = plain\nauth_file = {root / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\nmax_client_conn = 200\ndefault_pool_size = 20\n"
        "ignore_startup_parameters = extra_float_digits,application_name\n"
        f"logfile = {root / 'pgbouncer.log'}\npidfile = {root / 'pgbouncer.pid'}\n"
    )
    user_args = ["-u", "nobody"] if os.geteuid() == 0 else []
    if user_args:
        for path in root.iterdir():
            os.chmod(path, 0o644)
        shutil.chown(root, "nobody")
    process = subprocess.Popen(
        [binary, *user_args, str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                log = (
                    (root / "pgbouncer.log").read_text()
                    if (root / "pgbouncer.log").exists()
                    else ""
                )
                raise RuntimeError(f"pgbouncer did not start: {log}")
            time.sleep(0.05)
        netloc = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password)}@127.0.0.1:{port}"
        yield f"postgresql://{netloc}/{{database}}"
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)
