"""The coordinator's public address: a TLS reverse proxy (nginx) that lets the hospitals' nodes reach the Fleet API
and nobody anything else.

Flower 1.42 serves its Fleet API (what SuperNodes use), its Control API (``flwr run``, ``flwr supernode
register``, ...) and its Runtime API on one port, and the open-source Control API has no authentication:
whoever reaches that port can submit an app that every hospital then runs, or register a node key of
their own. So the SuperLink listens on the coordinator's loopback address only, where nothing but the
coordinator's own host can reach it, and this proxy is the public address:

- ``/v1/fleet/*``, POST only: forwarded to the SuperLink over TLS (the SuperLink's certificate is
  verified against the federation's CA); the nodes' signed requests pass through unchanged;
- everything else (``/v1/control/*``, ``/v1/runtime/*``, the API docs): 403, from nginx, before the
  SuperLink sees it.

The coordinator runs ``flwr run`` and ``flwr supernode register`` against the loopback address. Usage::

    python deploy/proxy.py --public 0.0.0.0:9093 --superlink 127.0.0.1:9092   # writes the config, runs nginx
    deploy/start_proxy.sh                                                        # the same, with defaults

nginx comes from the system's packages (Debian/Ubuntu: ``apt-get install nginx-light``); :func:`nginx_binary`
says so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mstkd.atomic import write_bytes

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "generated"

CONFIG = """\
# Written by deploy/proxy.py: the public address of the SuperLink. Fleet API only; everything else is refused.
worker_processes 1;
pid "{state}/nginx.pid";
error_log "{state}/error.log" warn;
events {{ worker_connections 1024; }}
http {{
    access_log "{state}/access.log";
    client_body_temp_path "{state}/body";
    proxy_temp_path "{state}/proxy";
    fastcgi_temp_path "{state}/fastcgi";
    uwsgi_temp_path "{state}/uwsgi";
    scgi_temp_path "{state}/scgi";
    server_tokens off;
    client_max_body_size 64m;        # Flower sends a message's objects in pieces of at most 5 MiB
    proxy_request_buffering off;     # stream both ways, nothing on the proxy's disk
    proxy_buffering off;
    proxy_max_temp_file_size 0;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    server {{
        listen {public};
        ssl_certificate "{creds}/server.pem";
        ssl_certificate_key "{creds}/server.key";
        ssl_protocols TLSv1.2 TLSv1.3;
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}
            # with a URI here nginx forwards the normalised path it matched, never the client's raw one
            proxy_pass https://{superlink}/v1/fleet/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate "{creds}/ca.crt";
            proxy_ssl_verify on;
            proxy_ssl_name localhost;    # a name every SuperLink certificate of deploy/credentials.py carries
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
        }}
        location / {{
            return 403;                  # Control API, Runtime API, docs: the coordinator's host only
        }}
    }}
}}
"""


class ProxyUnavailable(RuntimeError):
    """nginx is not installed here."""


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
"""A host name: letters, digits, hyphens and underscores (which some local names carry) in dot-separated labels of
at most 63 characters."""
PORT = re.compile(r"[0-9]{1,5}")
UNSAFE_PATH = re.compile(r'["\\$\x00-\x1f\x7f]')
"""What a path pasted (quoted) into nginx's configuration may not hold: a quote, a backslash, a variable's ``$``,
a control character."""


def check_host(host: str) -> str:
    """``host`` as an IP address in canonical form (IPv6 in brackets) or a DNS host name (letters, digits,
    hyphens, dots).

    Raises:
        ValueError: anything else (a path, a space, a ``;``, a zone index, a non-ASCII name), in one line.
    """
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    try:
        ip = None if "%" in inner else ipaddress.ip_address(inner)  # a zone index (fe80::1%eth0) may hold anything
    except ValueError:
        ip = None
    if ip is not None and bracketed == (ip.version == 6):
        return f"[{ip}]" if bracketed else str(ip)
    if ip is None and not bracketed and len(host) <= 253 and HOSTNAME.fullmatch(host):
        if not host.replace(".", "").isdigit():  # 127.1 is not a name
            return host
    hint = ""
    if not host.isascii():
        try:
            hint = f"; pass its A-label form ({host.encode('idna').decode()})"
        except UnicodeError:
            hint = "; pass a non-ASCII name in its A-label (xn--) form"
    raise ValueError(f"{host!r} is not an IP address (IPv6 in brackets) or a DNS host name{hint}")


def check_address(address: str, what: str, *, listen: bool = False) -> str:
    """``host:port`` with :func:`check_host`'s host (an IPv6 address may come without brackets: ``::1:9092``) and a
    port 1..65535, in canonical form; with ``listen`` (an address to listen on) also ``PORT`` and ``*:PORT``, every
    address.

    Raises:
        ValueError: anything else, in one line that names ``what`` (e.g. ``--public``).
    """
    host, colon, port = address.rpartition(":")
    if not (PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        reason = "no port 1..65535 after its last ':'"
    elif listen and host in ("", "*"):  # nginx's "listen 9093" and "listen *:9093": every address
        return f"*:{int(port)}" if host else str(int(port))
    elif not colon:
        reason = "no host before the port"
    else:
        try:
            ip = ipaddress.ip_address(host) if ":" in host and not host.startswith("[") else None
            return f"{check_host(f'[{ip}]' if ip else host)}:{int(port)}"
        except ValueError as exc:
            reason = str(exc)
    expected = "HOST:PORT, *:PORT or PORT" if listen else "HOST:PORT"
    raise ValueError(f"{what} {address!r}: {reason}; expected {expected}")


def _check_path(path: Path, what: str) -> Path:
    resolved = path.resolve()
    if UNSAFE_PATH.search(str(resolved)):
        raise ValueError(
            f"{what} {str(resolved)!r}: a quote, backslash, $ or control character cannot go into nginx.conf"
        )
    return resolved


def nginx_binary() -> str:
    """The nginx executable.

    Raises:
        ProxyUnavailable: none on PATH or in /usr/sbin (one line that says how to install it).
    """
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        raise ProxyUnavailable("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light)")
    return found


def install_nginx() -> str:
    """Install nginx from the system's packages (``apt-get install nginx-light``, as root) unless it is there;
    return its binary.

    Raises:
        ProxyUnavailable: not root, no ``apt-get``, or the installation failed (one line that says which).
    """
    try:
        return nginx_binary()
    except ProxyUnavailable:
        pass
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise ProxyUnavailable("nginx is not installed, and installing it needs apt-get as root (Debian/Ubuntu)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    for step in (install, [apt, "update", "-q"], install):  # the package lists of a fresh machine may be empty
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ProxyUnavailable(f"apt-get did not finish within 10 minutes ({' '.join(step[1:])})") from None
        if step is install and done.returncode == 0:
            return nginx_binary()
    last = (done.stderr or done.stdout).strip().splitlines()
    raise ProxyUnavailable(f"apt-get could not install nginx-light ({last[-1] if last else done.returncode})")


def write_config(creds: Path, state: Path, *, public: str, superlink: str) -> Path:
    """``<state>/nginx.conf`` for a public ``host:port`` in front of the SuperLink at ``superlink`` (loopback).

    Both addresses are checked (:func:`check_address`; the SuperLink's host must be a loopback one) and the
    paths quoted before anything is pasted into the configuration, which is written atomically (a link planted
    at ``nginx.conf`` is replaced, never written through).

    Raises:
        ValueError: an address or path that cannot go into the configuration, in one line.
    """
    public = check_address(public, "--public", listen=True)
    superlink = check_address(superlink, "--superlink")
    if superlink.rpartition(":")[0] not in LOOPBACK:
        raise ValueError(f"--superlink {superlink}: the SuperLink must listen on loopback only ({', '.join(LOOPBACK)})")
    conf = CONFIG.format(
        state=_check_path(state, "--state"),
        creds=_check_path(creds, "--creds"),
        public=f"{public} ssl",
        superlink=superlink,
    )
    state.mkdir(parents=True, exist_ok=True)
    return write_bytes(state / "nginx.conf", conf.encode())


def start_proxy(creds: Path, state: Path, *, public: str, superlink: str, log: Path) -> subprocess.Popen:
    """nginx in the foreground in its own session (stop it with :func:`deploy.processes.stop_group`)."""
    config = write_config(creds, state, public=public, superlink=superlink)
    cmd = [nginx_binary(), "-c", str(config), "-p", str(state.resolve()), "-g", "daemon off;"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public", default="0.0.0.0:9093", help="the address hospitals connect to (host:port)")
    parser.add_argument("--superlink", default="127.0.0.1:9092", help="the SuperLink, on loopback (host:port)")
    parser.add_argument("--creds", default=str(GENERATED), help="ca.crt, server.pem, server.key")
    parser.add_argument("--state", default=str(GENERATED / "proxy"), help="config, logs and pid of nginx")
    parser.add_argument("--install", action="store_true", help="install nginx first if missing (apt-get, as root)")
    args = parser.parse_args(argv)
    creds = Path(args.creds)
    missing = [name for name in ("ca.crt", "server.pem", "server.key") if not (creds / name).is_file()]
    if missing:
        print(
            f"error: {creds / missing[0]} missing; run python deploy/credentials.py ca / server first", file=sys.stderr
        )
        return 2
    state = Path(args.state)
    try:
        config = write_config(creds, state, public=args.public, superlink=args.superlink)
        binary = install_nginx() if args.install else nginx_binary()
    except (ProxyUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"public address {args.public} -> Fleet API of {args.superlink}; config {config}", file=sys.stderr)
    os.execv(binary, [binary, "-c", str(config), "-p", str(state.resolve()), "-g", "daemon off;"])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
