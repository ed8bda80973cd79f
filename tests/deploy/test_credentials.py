"""Deployment credentials (deploy.credentials): private from the first byte, never replaced unless forced, and
certificates that pass strict X.509 verification."""

from __future__ import annotations

import ssl
import threading

import pytest

from deploy.credentials import make_ca, make_node_key, make_server


def test_private_keys_are_private_from_their_first_byte(tmp_path, monkeypatch):
    import os

    import mstkd.atomic as atomic  # where deploy.credentials writes its files

    modes = []
    real_write = os.write

    def spy(fd, data):  # the file's permissions at the moment its first byte is written
        info = os.fstat(fd)
        if info.st_size == 0:
            modes.append(info.st_mode & 0o777)
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", spy)
    old_umask = os.umask(0)  # the most permissive umask: only the mode given at creation protects the file
    try:
        make_ca(tmp_path)
        make_server(tmp_path, ["link.example.org"])
        make_node_key(tmp_path, "hospital-a")
    finally:
        os.umask(old_umask)
    assert sorted(modes) == [0o600, 0o600, 0o600, 0o644, 0o644, 0o644]  # 3 keys, 2 certs, 1 public key
    for private in ("ca.key", "server.key", "nodes/hospital-a"):
        assert (tmp_path / private).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_existing_credentials_are_never_replaced_unless_forced(tmp_path, capsys):
    from deploy.credentials import main

    assert main(["--out", str(tmp_path), "node", "hospital-a"]) == 0
    key = (tmp_path / "nodes" / "hospital-a").read_bytes()
    assert main(["--out", str(tmp_path), "node", "hospital-a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[-1] and "--force" in err[-1]
    assert (tmp_path / "nodes" / "hospital-a").read_bytes() == key
    assert main(["--out", str(tmp_path), "--force", "node", "hospital-a"]) == 0
    assert (tmp_path / "nodes" / "hospital-a").read_bytes() != key
    assert main(["--out", str(tmp_path), "ca"]) == 0 and main(["--out", str(tmp_path), "ca"]) == 2


def test_certificates_pass_strict_x509_verification(tmp_path):
    from cryptography import x509

    from deploy.credentials import make_ca, make_server

    make_ca(tmp_path)
    make_server(tmp_path, ["link.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    for extension in (
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
        x509.KeyUsage,
        x509.ExtendedKeyUsage,
    ):
        cert.extensions.get_extension_for_class(extension)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()
    assert not errors


@pytest.mark.parametrize(
    "name",
    ["../../escaped-key", "ABSOLUTE", "a\nssh-ed25519 AAAA attacker", "a b", ".hidden", "-rf", "", "x" * 65, "a/b"],
)
def test_a_node_name_cannot_leave_the_keys_folder_or_add_a_line(tmp_path, capsys, name):
    from deploy.credentials import main

    out = tmp_path / "deep" / "creds"
    name = str(tmp_path / "absolute-key") if name == "ABSOLUTE" else name
    assert main(["--out", str(out), "node", "--", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: node name"), err
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written, in or out of creds
    with pytest.raises(ValueError, match="node name"):
        make_node_key(out, name)
    for good in ("hospital-a", "site_1.b", "x" * 64):
        _, public = make_node_key(out, good)
        assert public.read_text().count("\n") == 1 and public.read_text().endswith(f" {good}\n")


def test_bad_hosts_a_half_ca_or_a_file_as_out_are_one_line_not_tracebacks(tmp_path, capsys):
    from deploy.credentials import main

    def one_line(argv: list[str], *words: str) -> None:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), (argv, err)

    out = tmp_path / "creds"
    assert main(["--out", str(out), "ca"]) == 0
    capsys.readouterr()
    one_line(["--out", str(out), "server", "--host", "hôpital.example"], "A-label", "xn--hpital-ixa.example")
    for host in ("a b", "link;evil", "link.example.org\nx", "[::1%x]", ""):
        one_line(["--out", str(out), "server", "--host", host], "--host")
    assert not (out / "server.pem").exists()
    (out / "ca.crt").unlink()  # ca.key without ca.crt
    one_line(["--out", str(out), "server", "--host", "link.example.org"], "ca.crt")
    (out / "ca.crt").write_text("not a certificate")
    one_line(["--out", str(out), "server"], "CA", "cannot be read")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    one_line(["--out", str(a_file), "ca"], "is a file")
    one_line(["--out", str(a_file), "node", "hospital-a"], "is a file")
    assert main(["--out", str(out), "--force", "ca"]) == 0
    ok = ["--out", str(out), "server", "--host", "xn--hpital-ixa.example", "--host", "::1", "--host", "[fe80::1]"]
    ok += ["--host", "*.fl.example.org"]
    assert main(ok) == 0
    from cryptography import x509

    names = x509.load_pem_x509_certificate((out / "server.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "*.fl.example.org" in names.value.get_values_for_type(x509.DNSName)
