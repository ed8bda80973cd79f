"""The proxy's configuration (deploy.proxy): only a host and a port reach nginx.conf, written atomically."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from deploy import proxy

HOSTILE = [
    # a path after the port: the SuperLink's Control API behind /v1/fleet/ (proxy_pass https://...:19092/v1/;#...)
    ("--superlink", "127.0.0.1:19092/v1/;#"),
    ("--superlink", "127.0.0.1:9092; }"),
    ("--superlink", "127.0.0.1:9092\n"),
    ("--superlink", "[::1%;#]:9092"),
    ("--superlink", "127.0.0.1"),
    ("--superlink", "127.0.0.1:0"),
    ("--superlink", "10.0.0.5:9092"),  # not loopback
    # a location of its own that forwards everything
    ("--public", "0.0.0.0:9093 ssl; location /v1/ { proxy_pass https://127.0.0.1:9092; } #"),
    ("--public", "0.0.0.0 ssl; location / {}:9093"),
    ("--public", "0.0.0.0:65536"),
    ("--public", "0.0.0.0:٩٠٩٣"),
    ("--public", "hôpital.example:9093"),
    ("--public", "::9093"),
    ("--public", "**:9093"),
    ("--superlink", "9092"),  # a bare port listens on every address; the SuperLink is reached at one
    ("--superlink", "*:9092"),
]


def _creds(folder):
    folder.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (folder / name).write_text("")
    return folder


@pytest.mark.parametrize(("flag", "value"), HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
def test_an_address_that_is_not_host_and_port_never_reaches_nginx_conf(tmp_path, monkeypatch, capsys, flag, value):
    def no_exec(*args):
        raise AssertionError(f"nginx started with {value!r}")

    monkeypatch.setattr(proxy, "nginx_binary", lambda: "/bin/true")
    monkeypatch.setattr(proxy.os, "execv", no_exec)
    creds, state = _creds(tmp_path / "creds"), tmp_path / "state"
    assert proxy.main([flag, value, "--creds", str(creds), "--state", str(state)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} "), err
    assert not (state / "nginx.conf").exists()
    addresses = {"public": "0.0.0.0:9093", "superlink": "127.0.0.1:9092"} | {flag[2:]: value}
    with pytest.raises(ValueError, match=flag):
        proxy.write_config(creds, state, **addresses)


def test_good_addresses_and_odd_folders_make_a_config_nginx_accepts(tmp_path):
    from deploy.credentials import make_ca, make_server

    creds = tmp_path / "the creds; {x}"  # quoted in nginx.conf
    make_ca(creds)
    make_server(creds, [])
    for public, superlink, listen in [
        ("0.0.0.0:9093", "127.0.0.1:9092", "listen 0.0.0.0:9093 ssl;"),
        ("[::]:9093", "[::1]:9092", "listen [::]:9093 ssl;"),
        ("link.example.org:443", "localhost:9092", "listen link.example.org:443 ssl;"),
        ("9093", "::1:9092", "listen 9093 ssl;"),  # forms the proxy took before its addresses were parsed
        (":9093", "127.0.0.1:9092", "listen 9093 ssl;"),
        ("*:9093", "127.0.0.1:9092", "listen *:9093 ssl;"),
        ("fl_link.local:9093", "127.0.0.1:9092", "listen fl_link.local:9093 ssl;"),
    ]:
        state = tmp_path / f"state {public[:3]}"
        conf = proxy.write_config(creds, state, public=public, superlink=superlink).read_text()
        sent = "[::1]:9092" if superlink == "::1:9092" else superlink
        assert listen in conf and f"proxy_pass https://{sent}/v1/fleet/;" in conf
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.skip("nginx is not installed: the config's syntax was not checked by nginx")
    state = tmp_path / "state"
    config = proxy.write_config(creds, state, public="127.0.0.2:19093", superlink="127.0.0.1:19092")
    cmd = [nginx, "-t", "-c", str(config), "-p", str(state), "-e", str(state / "startup.log")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_link_planted_at_nginx_conf_is_replaced_not_written_through(tmp_path):
    creds, state = _creds(tmp_path / "creds"), tmp_path / "state"
    state.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (state / "nginx.conf").symlink_to(precious)
    config = proxy.write_config(creds, state, public="0.0.0.0:9093", superlink="127.0.0.1:9092")
    assert precious.read_text() == "keep me"
    assert not config.is_symlink() and "proxy_pass https://127.0.0.1:9092/v1/fleet/;" in config.read_text()
    with pytest.raises(ValueError, match="--state"):  # a path nginx would read as a variable or a string's end
        proxy.write_config(creds, tmp_path / 'st"ate$x', public="0.0.0.0:9093", superlink="127.0.0.1:9092")
