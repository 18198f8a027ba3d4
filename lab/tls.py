"""The lab's own certificate authority and the postgres host's server certificate.

Agents verify the server (`sslmode=verify-full`), so they need a CA to trust and a
server certificate whose subject alternative names hold every address they connect
to. Both are made here with the openssl command line, once per lab, into the lab's
secrets directory; `lab down` removes them with the rest of its state.

The CA's private key is thrown away as soon as the server certificate is signed:
nothing else can ever be signed with it, so the CA certificate given to the agents
vouches for this one server only. Private keys are written mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lab.backends.base import LabError

CA_CERT = "ca-cert"
SERVER_CERT = "server-cert"
SERVER_KEY = "server-key"
FILES = (CA_CERT, SERVER_CERT, SERVER_KEY)
SANS_RECORD = "server-cert.sans"  # what the certificate was made for, to notice changes
VALID_DAYS = 825  # the longest validity clients commonly accept for a server certificate
CURVE = "prime256v1"  # P-256: fast handshakes, accepted by every TLS library


def subject_alt_names(names: Sequence[str], addresses: Sequence[str]) -> str:
    """The subjectAltName value: DNS names and IP addresses, sorted for a stable record."""
    entries = [f"DNS:{n}" for n in sorted(set(names))]
    entries += [f"IP:{a}" for a in sorted(set(addresses), key=ipaddress.ip_address)]
    return ",".join(entries)


def ensure_certificates(directory: Path, *, lab_name: str, names: Sequence[str],
                        addresses: Sequence[str]) -> bool:
    """Make the CA and the server certificate unless they exist for these names.

    Returns True if new files were made (the server then needs to load them).
    """
    sans = subject_alt_names(names, addresses)
    record = directory / SANS_RECORD
    if all((directory / f).exists() for f in FILES) and record.exists() \
            and record.read_text().strip() == sans:
        return False
    if shutil.which("openssl") is None:
        raise LabError("openssl is missing (it makes the lab's TLS certificates): "
                       "apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    with tempfile.TemporaryDirectory(prefix="pgvpn-ca-") as scratch:
        work = Path(scratch)  # 0700: the CA key lives here, and only until we return
        extensions = work / "server.ext"
        extensions.write_text(
            f"subjectAltName = {sans}\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n")
        key_options = ["-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{CURVE}", "-nodes"]
        openssl(["req", "-x509", *key_options, "-keyout", work / "ca.key",
                 "-out", work / "ca.crt", "-days", str(VALID_DAYS),
                 "-subj", f"/CN=pgvpn lab CA ({lab_name})",
                 "-addext", "basicConstraints = critical, CA:TRUE, pathlen:0",
                 "-addext", "keyUsage = critical, keyCertSign, cRLSign"])
        openssl(["req", "-new", *key_options, "-keyout", work / "server.key",
                 "-out", work / "server.csr", "-subj", f"/CN={sorted(names)[0]}"])
        openssl(["x509", "-req", "-in", work / "server.csr", "-CA", work / "ca.crt",
                 "-CAkey", work / "ca.key", "-set_serial", str(int.from_bytes(
                     os.urandom(16), "big") >> 1), "-days", str(VALID_DAYS),
                 "-extfile", extensions, "-out", work / "server.crt"])
        for source, target, mode in (("ca.crt", CA_CERT, 0o644),
                                     ("server.crt", SERVER_CERT, 0o644),
                                     ("server.key", SERVER_KEY, 0o600)):
            install(work / source, directory / target, mode)
    record.write_text(sans + "\n")
    return True


def install(source: Path, target: Path, mode: int) -> None:
    """Copy with `mode` from the first byte on (a key is never readable by others)."""
    descriptor = os.open(target.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(source.read_bytes())
    os.chmod(target.with_suffix(".tmp"), mode)
    os.replace(target.with_suffix(".tmp"), target)


def openssl(argv: list[str | Path]) -> None:
    done = subprocess.run(["openssl", *map(str, argv)], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        detail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise LabError(f"openssl {argv[0]} failed while making the lab's certificates: "
                       f"{detail}")
