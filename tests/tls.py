"""Certificates for a TLS-only throwaway cluster, made with the ``openssl`` command
(Debian's ``openssl``; installed with apt-get when missing and running as root, as on CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest


def openssl_binary() -> str | None:
    found = shutil.which("openssl")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "openssl"]):
        subprocess.run(command, env=env, check=False, capture_output=True, timeout=600)
    return shutil.which("openssl")


@attrs.frozen
class Certificates:
    """A CA, a server certificate it signed (for 127.0.0.1), a client certificate it
    signed (for ``client_user``), and a CA that signed neither."""

    root: Path
    client_user: str

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def wrong_ca(self) -> Path:
        return self.root / "wrong-ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.root / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.root / "client.key"

    def server_files(self) -> dict[str, bytes]:
        """What the server's data directory needs (see `temp_cluster`'s ``files``)."""
        return {
            name: (self.root / name).read_bytes() for name in ("server.crt", "server.key", "ca.crt")
        }


def make_certificates(root: Path, client_user: str) -> Certificates:
    """Make the certificates in ``root`` (EC keys: quick to make)."""
    binary = openssl_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed and could not be installed")
        pytest.skip("openssl is not installed (apt-get install openssl)")

    def run(*args: str) -> None:
        subprocess.run([binary, *args], cwd=root, check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "wrong-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "3",
            "-subj", f"/CN=trio-eventstore test {ca}")  # fmt: skip
    (root / "server.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    for name, subject, extensions in (
        ("server", "/CN=127.0.0.1", ["-extfile", "server.ext"]),
        ("client", f"/CN={client_user}", []),
    ):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "3", *extensions)  # fmt: skip
    os.chmod(root / "client.key", 0o600)
    return Certificates(root, client_user)
