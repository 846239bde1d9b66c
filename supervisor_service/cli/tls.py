"""The client TLS flags every client command of the CLI takes (`--tls-ca`, `--tls-cert`, `--tls-key`,
`--tls-server-name`, or the `SUPERVISOR_CLIENT_TLS_*` variables), and the `certs` command that makes
a throwaway CA and certificates to try mTLS locally (docs/design.md §14.1)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor_service.security.client_env import CLIENT_TLS_ENV

if TYPE_CHECKING:
    from supervisor_service.security.tls import ClientTLS

_FLAGS = (
    ("ca_file", "--tls-ca", "FILE", "CA that signs the service's certificate; turns TLS on"),
    ("cert_file", "--tls-cert", "FILE", "client certificate for mTLS (with --tls-key); turns TLS on (the system's "
     "roots verify the service unless --tls-ca is given)"),
    ("key_file", "--tls-key", "FILE", "private key of --tls-cert"),
    ("server_name", "--tls-server-name", "NAME", "name to verify the service's certificate against (default: "
     "the host of --addr)"),
)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    for field, flag, metavar, text in _FLAGS:
        env = CLIENT_TLS_ENV[field]
        parser.add_argument(flag, dest=f"tls_{field}", default=os.environ.get(env, ""), metavar=metavar,
                            help=f"{text} (default: ${env})")


def client_tls(args: argparse.Namespace) -> ClientTLS | None:
    """The TLS the flags ask for (None: plaintext); TLSFileError naming the flag and the file."""
    from supervisor_service.security.tls import ClientTLS, TLSFileError  # grpc: only for a client command

    tls = ClientTLS(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)
    if not (tls.ca_file or tls.cert_file or tls.key_file):
        if tls.server_name:
            raise TLSFileError("--tls-server-name is given but neither --tls-ca nor --tls-cert: TLS is off")
        return None
    tls.check("--tls-ca/--tls-cert/--tls-key")
    return tls


def add_certs_parser(sub) -> None:
    certs = sub.add_parser(
        "certs",
        help="make a throwaway CA, a server certificate and client certificates, to try mTLS locally",
        description="Writes a new CA (ca.pem, ca-key.pem), a server certificate for localhost, 127.0.0.1 and "
        "--server-name (server.pem), and client certificates whose identity is their first DNS name and common "
        "name: datanode-1..N, metasrv, ops-<name> for each --operator, and admin. Keys are readable by their owner "
        "only. Not for production: take those from your own CA.",
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if missing)")
    certs.add_argument("--datanodes", type=int, default=3, metavar="N", help="datanode-1..N certificates (default 3)")
    certs.add_argument("--operator", action="append", default=[], metavar="NAME",
                       help="an ops-NAME certificate (repeatable; default: alice)")
    certs.add_argument("--server-name", action="append", default=[], metavar="NAME",
                       help="another DNS name of the server certificate (repeatable)")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    certs.add_argument("--force", action="store_true", help="replace certificates already in --out")


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_DATANODES = 10_000


def certs_command(args: argparse.Namespace) -> int:
    from supervisor_service.security.certs import write_bundle

    def fail(message: str) -> int:
        print(f"supervisor-service: error: {message}", file=sys.stderr)
        return 2

    operators = args.operator or ["alice"]
    bad = [o for o in operators if not o or len(o) > 59 or not set(o) <= _NAME_CHARS or o.startswith("-")]
    if bad:
        return fail(f"--operator {bad[0]!r}: expected lower-case letters, digits and '-' (a DNS label after 'ops-')")
    names = [n for n in args.server_name if n]
    if any(len(n) > 253 or not all(c.isalnum() or c in ".-*" for c in n) or not n.isascii() for n in names):
        return fail("--server-name: expected DNS names (letters, digits, '.', '-')")
    if not 0 <= args.datanodes <= _MAX_DATANODES:
        return fail(f"--datanodes: expected 0..{_MAX_DATANODES}, got {args.datanodes}")
    if not 1 <= args.days <= 3650:
        return fail(f"--days: expected 1..3650, got {args.days}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(f"--out {str(out)!r} exists and is not a directory")
    if (out / "ca.pem").exists() and not args.force:
        return fail(f"{str(out / 'ca.pem')!r} exists: a new CA would not verify the certificates made with the old one "
                    "(--force replaces them all)")
    try:
        files = write_bundle(out, datanodes=args.datanodes, operators=operators, server_names=names, days=args.days)
    except OSError as exc:
        return fail(f"cannot write into {str(out)!r}: {exc.strerror or exc}")
    certs = sorted(n for n in files if not n.endswith("-key"))
    print(f"wrote {len(files)} files to {out}: {', '.join(certs)} (each with its -key.pem)")
    print("server: SUPERVISOR_TLS_CERT_FILE={0}/server.pem SUPERVISOR_TLS_KEY_FILE={0}/server-key.pem "
          "SUPERVISOR_TLS_CLIENT_CA_FILE={0}/ca.pem".format(out))
    print(f"client: --tls-ca {out}/ca.pem --tls-cert {out}/admin.pem --tls-key {out}/admin-key.pem")
    return 0
