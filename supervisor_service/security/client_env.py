"""The environment variables of a client's TLS: the CLI's defaults of `--tls-*`, not settings of the
service (`serve` ignores them). Apart from `tls.py` so that reading them imports no grpc."""

CLIENT_TLS_ENV = {
    "ca_file": "SUPERVISOR_CLIENT_TLS_CA_FILE",
    "cert_file": "SUPERVISOR_CLIENT_TLS_CERT_FILE",
    "key_file": "SUPERVISOR_CLIENT_TLS_KEY_FILE",
    "server_name": "SUPERVISOR_CLIENT_TLS_SERVER_NAME",
}
