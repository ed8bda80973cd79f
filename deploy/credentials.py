"""Make the credentials of a deployment: a certificate authority, the SuperLink's TLS certificate, node keys.

Usage (everything lands in ``deploy/generated/``, which git ignores; keep private keys private):

    python deploy/credentials.py ca                      # generated/ca.crt, ca.key
    python deploy/credentials.py server --host link.example.org --host 10.0.0.5
                                                          # generated/server.pem, server.key (signed by the CA)
    python deploy/credentials.py node hospital-a         # generated/nodes/hospital-a{,.pub}

The SuperLink's certificate must name every address the SuperNodes and the coordinator use to
reach it (``--host``, repeatable; 127.0.0.1 and localhost are always included). A node key is an
ECDSA P-384 key pair in OpenSSH format: the hospital keeps the private key, the coordinator
registers the public one (``flwr supernode register <key>.pub <connection>``).

Private keys are created with mode 0600 from their first byte. An existing file is never
replaced unless ``--force`` is given: a new CA or node key invalidates what was made with the old one.

Both certificates carry what strict X.509 verification (``VERIFY_X509_STRICT``, the default of
Python 3.13's ``ssl`` and of recent OpenSSL clients) asks for: subject and authority key
identifiers, key usage, and for the server the TLS server purpose.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.proxy import check_host
from mstkd.atomic import write_bytes

GENERATED = Path(__file__).resolve().parent / "generated"
VALID_DAYS = 825
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A node's name, which names its key files and ends its public key's line: no path, no space, at most 64."""


class CredentialExists(FileExistsError):
    """A credential file is already there: replacing it breaks what was signed or registered with it."""


class BadCredentialInput(ValueError):
    """A node name, a host or a CA that cannot make a credential (one line that says why)."""


def check_node_name(name: str) -> str:
    """``name`` if it is a plain file name (:data:`NODE_NAME`), which a key's files and comment can carry.

    Raises:
        BadCredentialInput: a path (``../x``, ``/etc/x``), a space, a newline, or over 64 characters.
    """
    if not NODE_NAME.fullmatch(name):
        raise BadCredentialInput(
            f"node name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _alt_name(host: str) -> x509.GeneralName:
    """A certificate's name for ``host``: an IP address (IPv6 with or without brackets) or an ASCII DNS name
    (:func:`deploy.proxy.check_host`), which may start with a wildcard label (``*.example.org``).

    Raises:
        BadCredentialInput: anything else, a non-ASCII name included (with its A-label form to pass instead).
    """
    wildcard = "*." if host.startswith("*.") else ""  # a certificate for every name under a domain
    try:
        checked = check_host(f"[{host}]" if ":" in host and not host.startswith("[") else host.removeprefix(wildcard))
    except ValueError as exc:
        raise BadCredentialInput(f"--host {exc}") from None
    try:
        return x509.IPAddress(ipaddress.ip_address(checked.strip("[]")))
    except ValueError:
        return x509.DNSName(wildcard + checked)


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    missing = [name for name in ("ca.crt", "ca.key") if not (out / name).is_file()]
    if missing:
        raise BadCredentialInput(f"no {missing[0]} in {out}; run `python deploy/credentials.py ca` first")
    try:
        cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise BadCredentialInput(f"the CA in {out} cannot be read ({type(exc).__name__}: {str(exc)[:100]!r})") from None
    der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BadCredentialInput(f"ca.key in {out} is not an EC key")
    if key.public_key().public_bytes(*der) != cert.public_key().public_bytes(*der):
        raise BadCredentialInput(f"ca.key in {out} is not the key of ca.crt")
    return cert, key


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every file of a set before writing any, so a refusal leaves the set whole."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise CredentialExists(
            f"{existing[0]} exists; --force replaces it (what was signed or registered with it stops working)"
        )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates (and revocation lists); a TLS server with an EC key signs handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(out: Path, name: str = "MST-KDNet federation CA", *, force: bool = False) -> tuple[Path, Path]:
    """Self-signed certificate authority: ``ca.crt`` and ``ca.key`` (an existing CA is kept unless ``force``)."""
    _refuse_existing([out / "ca.crt", out / "ca.key"], force)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return (
        write_bytes(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM)),
        write_bytes(out / "ca.key", _pem_key(key), private=True),
    )


def make_server(out: Path, hosts: list[str], *, force: bool = False) -> tuple[Path, Path]:
    """The SuperLink's certificate for ``hosts`` (names or IP addresses), signed by the CA in ``out``."""
    _refuse_existing([out / "server.pem", out / "server.key"], force)
    alt = list(dict.fromkeys(_alt_name(host) for host in [*hosts, "127.0.0.1", "localhost"]))
    ca_cert, ca_key = _load_ca(out)
    names = [str(name.value) for name in alt]
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return (
        write_bytes(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        write_bytes(out / "server.key", _pem_key(key), private=True),
    )


def make_node_key(out: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 OpenSSH key pair for SuperNode authentication: ``nodes/<name>`` and ``nodes/<name>.pub``.

    Raises:
        BadCredentialInput: ``name`` is not a plain file name (:func:`check_node_name`).
    """
    check_node_name(name)
    _refuse_existing([out / "nodes" / name, out / "nodes" / f"{name}.pub"], force)
    key = _key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (
        write_bytes(out / "nodes" / name, private, private=True),
        write_bytes(out / "nodes" / f"{name}.pub", public + f" {name}\n".encode()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(GENERATED), help=f"output folder (default {GENERATED})")
    parser.add_argument("--force", action="store_true", help="replace existing files (default: refuse)")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("ca", help="certificate authority")
    server = sub.add_parser("server", help="the SuperLink's TLS certificate")
    server.add_argument("--host", action="append", default=[], help="an address the SuperLink is reached at")
    node = sub.add_parser("node", help="a SuperNode key pair")
    node.add_argument("name", help="site name, e.g. hospital-a")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        if args.what == "ca":
            paths = make_ca(out, force=args.force)
        elif args.what == "server":
            paths = make_server(out, args.host, force=args.force)
        else:
            paths = make_node_key(out, args.name, force=args.force)
    except (CredentialExists, BadCredentialInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder in the way, no permission, a full disk
        print(f"error: cannot write {exc.filename or out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
