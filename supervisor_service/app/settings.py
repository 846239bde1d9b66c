"""Settings, read once in `main`: defaults < TOML file (`--config`) < environment (`SUPERVISOR_*`) < CLI flags.

Every field has its unit in its name and a description. A setting that sets a
field of the core's option dataclasses (`PhiAccrualOptions`, `FailoverPolicy`,
`GuardSettings`) takes its default, bounds and description from that field's
declaration (`_core`, docs/design.md §8); the settings of the service alone are
declared here, with a docstring. The README's configuration table is generated
from this class (`supervisor-service settings --markdown`), so the two cannot
drift apart.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from supervisor_service.core import FailoverPolicy, GuardSettings, Option, PhiAccrualOptions, settable_fields

ENV_PREFIX = "SUPERVISOR_"
_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_ZONE = re.compile(r"[A-Za-z0-9_.~-]{1,64}")  # an ASCII label (an IDN label is checked in its punycode form)
_MAX_HOST_CHARS = 253  # DNS: a name is at most 253 characters (in its ASCII form)


def short_repr(value: str, limit: int = 64) -> str:
    """`value` for an error message: its repr, cut to a short prefix (input can be megabytes)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _check_host(host: str) -> None:
    if host.startswith("[") and host.endswith("]"):
        address, _, zone = host[1:-1].partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{short_repr(host)} is not an IPv6 address") from None
        if "%" in host and not _ZONE.fullmatch(zone):  # an interface name or index, e.g. [fe80::1%eth0]
            raise ValueError(f"{short_repr(host)} has an invalid zone")
        return
    if ":" in host:
        raise ValueError("an IPv6 host goes in brackets, e.g. [fe80::1%eth0]:4001")
    ascii_host = host
    if not host.isascii():
        # An internationalized name, e.g. bücher.example: checked in its punycode form, and without
        # the invisible characters (format, control, spaces) that the IDNA mapping would drop.
        try:
            if any(unicodedata.category(ch)[0] in "CZ" for ch in host):
                raise UnicodeError
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{short_repr(host)} is not a valid host name") from None
    labels = ascii_host[:-1].split(".") if ascii_host.endswith(".") else ascii_host.split(".")
    if len(ascii_host) > _MAX_HOST_CHARS or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{short_repr(host)} is not a valid host name")


def check_host_port(value: str, *, allow_empty: bool, allow_port_zero: bool = True) -> str:
    """`host:port`: a host name (internationalized ones too), an IPv4 address, or an IPv6 address
    in brackets (a zone too: `[fe80::1%eth0]:4001`); raises ValueError with what is wrong."""
    if value == "" and allow_empty:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port):
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:50051), got {short_repr(value)}")
    _check_host(host)
    number = int(port)
    if number > 65535 or (number == 0 and not allow_port_zero):
        raise ValueError(f"port must be in 1..65535, got {number}")
    return value


class ConfigError(Exception):
    """Invalid settings; the message names every bad setting."""


CORE_OPTIONS: tuple[type, ...] = (PhiAccrualOptions, FailoverPolicy, GuardSettings)
"""The core's option dataclasses, whose settable fields are settings."""
_CORE_SETTINGS: dict[str, tuple[Any, Option]] = {
    setting: (f.default, opt) for cls in CORE_OPTIONS for f, setting, opt in settable_fields(cls)
}


def _core(setting: str) -> Any:
    """The field of `setting`, from the core option field it sets: its default, bounds and description."""
    default, opt = _CORE_SETTINGS[setting]
    return Field(
        default if opt.setting_default is None else opt.setting_default,
        ge=opt.ge, gt=opt.gt, le=opt.le, description=opt.doc,
    )


class Settings(BaseSettings):
    """All settings of the service."""

    # Every number must be finite: an `inf` pause or threshold is not a setting, it is an overflow later.
    # The docstring under a field is its description.
    model_config = SettingsConfigDict(
        env_prefix="SUPERVISOR_", extra="forbid", validate_default=True, allow_inf_nan=False,
        use_attribute_docstrings=True,
    )

    # A field `= _core("name")` is a core option's: its default, bounds and meaning are declared
    # with that option (core/options.py, core/detector.py).

    # -- network
    grpc_addr: str = "127.0.0.1:50051"
    """Address the gRPC server listens on (port 0: any free port)."""
    metrics_addr: str = "127.0.0.1:9464"
    """Address of the Prometheus /metrics endpoint; empty disables it."""
    metrics_max_connections: int = Field(256, ge=1, le=10_000)
    """Connections the /metrics endpoint holds open at once; one more evicts the oldest that has not sent its request, or gets 503 when all are being answered."""
    metrics_timeout_ms: int = Field(5000, ge=100, le=600_000)
    """A /metrics connection must send its request within this, and take the answer within this again, or it is closed."""
    advertise_addr: str = ""
    """Address clients are told to reach this replica at; empty: the gRPC address."""
    auth_token: str = ""
    """If set, every RPC but health must carry `authorization: Bearer <token>` metadata (UNAUTHENTICATED otherwise), or another credential (auth_tokens_file, a client certificate); its caller is the identity `token`."""

    # -- TLS (docs/design.md §14.1); every file is PEM, re-read when it changes on disk
    tls_cert_file: str = ""
    """Server certificate chain of the gRPC port; with tls_key_file, the port speaks TLS only (plaintext clients are refused). Re-read when it changes: new connections get the new certificate without a restart."""
    tls_key_file: str = ""
    """Private key of tls_cert_file (unencrypted PEM)."""
    tls_client_ca_file: str = ""
    """When set (with tls_cert_file), every client must present a certificate signed by this CA (mTLS)."""
    tls_max_connection_age_ms: int = Field(300_000, ge=0, le=86_400_000)
    """With TLS: a connection older than this (±10%) is asked to close, so every client handshakes again (a replaced or revoked certificate stops working within this plus the grace); 0: connections live on."""
    tls_max_connection_age_grace_ms: int = Field(30_000, ge=0, le=86_400_000)
    """Time calls still open on an aged connection (heartbeat streams) keep running before it is closed; the client reconnects with a new handshake."""
    tls_handshake_timeout_ms: int = Field(10_000, ge=100, le=600_000)
    """With TLS: a connection that has not completed its handshake within this is closed (grpc's default is 120 s: a flood of stalled handshakes would hold that many sockets that long)."""
    remote_tls_ca_file: str = ""
    """CA of the Selector, PeerLookup and RegionMigration services; when set, calls to them use TLS."""
    remote_tls_cert_file: str = ""
    """Client certificate presented to the remote services (mTLS); needs remote_tls_key_file and remote_tls_ca_file."""
    remote_tls_key_file: str = ""
    """Private key of remote_tls_cert_file."""
    remote_tls_server_name: str = ""
    """Name the remote services' certificates are verified against; empty: the host of each endpoint."""
    etcd_tls_ca_file: str = ""
    """CA of etcd (`etcds://` in store); empty: the system's roots."""
    etcd_tls_cert_file: str = ""
    """Client certificate presented to etcd (etcd's --client-cert-auth); needs etcd_tls_key_file."""
    etcd_tls_key_file: str = ""
    """Private key of etcd_tls_cert_file."""
    metrics_tls_cert_file: str = ""
    """Certificate of the /metrics endpoint; with metrics_tls_key_file, it serves HTTPS only. Read at start."""
    metrics_tls_key_file: str = ""
    """Private key of metrics_tls_cert_file."""
    metrics_tls_client_ca_file: str = ""
    """When set, a scraper must present a certificate signed by this CA."""

    # -- remote services
    selector_endpoint: str = ""
    """host:port of the Selector service; empty: the embedded round-robin selector."""
    peer_lookup_endpoint: str = ""
    """host:port of the PeerLookup service; empty: addresses from the datanodes' heartbeats."""
    region_migration_endpoint: str = ""
    """host:port of the RegionMigration service; empty: the embedded dry-run journal."""
    remote_timeout_ms: int = Field(5000, ge=1, le=600_000)
    """Deadline of each call to a remote service."""
    failover_workers: int = Field(4, ge=1, le=256)
    """Threads making remote calls for failover (they never block the supervisor thread)."""
    migration_base_timeout_ms: int = _core("migration_base_timeout_ms")
    max_failover_timeout_ms: int = _core("max_failover_timeout_ms")
    submit_retry_backoff_ms: int = _core("submit_retry_backoff_ms")
    submit_retry_backoff_max_ms: int = _core("submit_retry_backoff_max_ms")
    resubmit_backoff_ms: int = _core("resubmit_backoff_ms")
    resubmit_backoff_max_ms: int = _core("resubmit_backoff_max_ms")
    max_resubmissions_per_window: int = _core("max_resubmissions_per_window")
    resubmit_window_ms: int = _core("resubmit_window_ms")
    expiry_checkpoint_interval_ms: int = _core("expiry_checkpoint_interval_ms")
    migration_status_poll_interval_ms: int = _core("migration_status_poll_interval_ms")
    drain_regions_per_s: float = _core("drain_regions_per_s")
    drain_burst_regions: int = _core("drain_burst_regions")
    drain_max_attempts: int = _core("drain_max_attempts")
    journal_capacity: int = Field(10_000, ge=1, le=10_000_000)
    """Entries the embedded dry-run journal keeps (newest)."""
    selector_alive_window_ms: int = Field(0, ge=0, le=86_400_000)
    """Embedded selector: a datanode heard from within this window is a candidate; 0: the acceptable heartbeat pause."""

    # -- detection
    tick_interval_ms: int = _core("tick_interval_ms")
    phi_threshold: float = _core("phi_threshold")
    min_std_deviation_ms: float = _core("min_std_deviation_ms")
    acceptable_heartbeat_pause_ms: float = _core("acceptable_heartbeat_pause_ms")
    max_sample_size: int = _core("max_sample_size")
    first_heartbeat_estimate_ms: int = _core("first_heartbeat_estimate_ms")
    heartbeat_clock: Literal["server", "client"] = "server"
    """Whose clock stamps heartbeats: `server` (receipt time) or `client` (the request's timestamp_millis)."""
    max_client_clock_skew_ms: int = Field(1000, ge=0, le=3_600_000)
    """With heartbeat_clock=client: a timestamp_millis further than this from the server's receipt time (or missing) is applied at the receipt time, and the answer says so. Keep it well below acceptable_heartbeat_pause_ms: a clock this far behind costs a datanode as much of its pause. 0: no bound (only to replay recorded timestamps: one stamp far ahead then keeps a datanode alive until that time)."""

    # -- queue and limits
    event_queue_size: int = Field(1024, ge=1, le=1_000_000)
    """Capacity of the supervisor's event queue."""
    enqueue_timeout_ms: int = Field(1000, ge=0, le=60_000)
    """How long a request waits for room in a full queue before RESOURCE_EXHAUSTED."""
    max_regions_per_heartbeat: int = Field(100_000, ge=1, le=10_000_000)
    """Regions one heartbeat may carry; one naming more refreshes only the regions already watched (and adds none), and its answer says so."""
    max_regions_per_request: int = Field(100_000, ge=1, le=10_000_000)
    """Regions one Register/Deregister/Reset call may carry."""
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest gRPC message accepted."""
    max_dump_page_size: int = Field(10_000, ge=1, le=1_000_000)
    """Largest Dump page (the default page is 1000 or this, whichever is smaller)."""
    max_concurrent_streams: int = Field(10_000, ge=1, le=1_000_000)
    """Heartbeat streams served at once (RESOURCE_EXHAUSTED past it)."""
    max_queued_heartbeat_bytes: int = Field(64 * 1024 * 1024, ge=1, le=2**36)
    """Region ids of queued heartbeats the event queue holds at most, in bytes (8 per region); a heartbeat beyond it waits for room like one beyond event_queue_size."""
    max_queue_fraction_per_datanode: float = Field(0.1, gt=0, le=1)
    """Fraction of the event queue (events, and heartbeat bytes) one datanode's queued heartbeats may take: a flooding datanode waits, the others do not (its first queued heartbeat is always admitted)."""

    # -- state and leadership
    store: str = "sqlite"
    """State store: `sqlite` (a file in data_dir; one replica), `memory` (nothing survives a restart), `etcd://host:port[,host:port]` (`etcds://`: TLS, see etcd_tls_*) or `postgresql://user[:password]@host[:port]/dbname` (several replicas, leader election; the password is never logged, PGPASSFILE or PGPASSWORD keep it out of the setting)."""
    data_dir: Path = Path("./data")
    """Directory of the SQLite store; a relative path is resolved once, at start, against the working directory (the absolute path is logged in service_started)."""
    store_prefix: str = "/region-supervisor/default"
    """Key prefix in the store (etcd, PostgreSQL: one per cluster sharing the etcd or the database)."""
    store_flush_interval_ms: int = Field(10, ge=0, le=10_000)
    """Group-commit window: state changes are written together at most this late."""
    allow_new_store: bool = False
    """Start although data_dir shows it held a SQLite store that is now missing or another one (deleted, replaced): begin from an empty state (or that other file). Leader terms still continue above the highest used before. Also `serve --new-store`."""
    leader_lease_ttl_ms: int = Field(5000, ge=2000, le=600_000)
    """Leader lease time to live (etcd, PostgreSQL store); a leader steps down before it can expire."""
    initialization_delay_ms: int = Field(0, ge=0, le=600_000)
    """Pause between becoming leader and loading the state (lets a previous leader's last writes land)."""
    warmup_grace_ms: int = _core("warmup_grace_ms")
    warmup_fraction: float = _core("warmup_fraction")

    # -- guards (docs/design.md §5); each is off at the value in brackets
    guards_enabled: bool = True
    """Master switch of the guards below (false: fail over whatever crosses the threshold, as the original)."""
    max_local_pause_ms: int = _core("max_local_pause_ms")
    local_pause_hold_ms: int = _core("local_pause_hold_ms")
    overload_queue_fraction: float = _core("overload_queue_fraction")
    overload_hold_ms: int = _core("overload_hold_ms")
    max_failed_datanode_fraction: float = _core("max_failed_datanode_fraction")
    mass_failure_min_datanodes: int = _core("mass_failure_min_datanodes")
    mass_failure_silence_ms: int = _core("mass_failure_silence_ms")
    mass_failure_recovery_ms: int = _core("mass_failure_recovery_ms")
    failover_rate_per_s: float = _core("failover_rate_per_s")
    failover_burst: int = _core("failover_burst")
    target_regions_per_s: float = _core("target_regions_per_s")
    target_burst_regions: int = _core("target_burst_regions")
    target_holddown_ms: int = _core("target_holddown_ms")
    flap_window_ms: int = _core("flap_window_ms")
    flap_threshold: int = _core("flap_threshold")
    flap_backoff_base_ms: int = _core("flap_backoff_base_ms")
    flap_backoff_max_ms: int = _core("flap_backoff_max_ms")
    failover_count_decay_ms: int = _core("failover_count_decay_ms")
    reject_stale_epochs: bool = True
    """Reject heartbeats whose node_epoch is older than the newest seen for that datanode, while that one was heard within acceptable_heartbeat_pause_ms (after that, a lower epoch is a new life)."""
    rebaseline_after_maintenance: bool = _core("rebaseline_after_maintenance")
    failover_history_capacity: int = _core("failover_history_capacity")

    # -- identity, roles and the audit trail (docs/design.md §14)
    auth_tokens_file: str = ""
    """TOML file of named bearer tokens, `[tokens]` `name = "sha256:<hex of the token>"`: a call with `authorization: Bearer <token>` is that name; re-read when it changes. Set (or auth_token set): every call but health must carry a known token or a client certificate."""
    authz_policy_file: str = ""
    """TOML file of roles, `[roles]` `"identity glob" = "role"` (datanode, metasrv, operator, reader, admin; first match wins) and `bind_datanode_ids`; re-read when it changes. Empty: any authenticated caller may call anything."""
    security_file_check_interval_ms: int = Field(1000, ge=0, le=600_000)
    """How often auth_tokens_file and authz_policy_file are checked for a change (mtime, size, inode); a change that does not parse keeps the last valid one."""
    audit_capacity: int = Field(5000, ge=1, le=1_000_000)
    """Entries the audit trail keeps in the state store (newest; about 300 bytes each, at most 2 KB). ListAudit reads them in one answer: on etcd keep this times their size under its client's 4 MiB."""
    audit_refusal_interval_ms: int = Field(10_000, ge=0, le=3_600_000)
    """Refused calls of one identity, RPC and code are recorded once per this interval; the others are counted into the next entry (a flood of refused calls does not flood the store). 0: every one."""

    # -- process
    shutdown_timeout_ms: int = Field(10_000, ge=0, le=600_000)
    """Budget of graceful shutdown (grace period of in-flight RPCs plus draining)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["auto", "json", "text"] = "auto"
    """Log format; auto: JSON unless stderr is a terminal."""

    @field_validator("grpc_addr", "metrics_addr")
    @classmethod
    def _listen_addr(cls, v: str, info: ValidationInfo) -> str:
        return check_host_port(v, allow_empty=info.field_name == "metrics_addr")  # no metrics: empty

    @field_validator("advertise_addr", "selector_endpoint", "peer_lookup_endpoint", "region_migration_endpoint")
    @classmethod
    def _endpoints(cls, v: str) -> str:
        return check_host_port(v, allow_empty=True, allow_port_zero=False)

    @field_validator("auth_tokens_file", "authz_policy_file")
    @classmethod
    def _security_file(cls, v: str, info: ValidationInfo) -> str:
        if v:
            from supervisor_service.security.identity import load_tokens
            from supervisor_service.security.policy import load_policy

            # PolicyError (a ValueError): one line naming the file and the entry
            (load_tokens if info.field_name == "auth_tokens_file" else load_policy)(v)
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, v: Path) -> Path:
        # Once, here: a relative directory must not move if the working directory changes later,
        # and the operator must be able to see which directory it is.
        return Path(os.path.abspath(os.path.expanduser(v)))

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v in ("sqlite", "memory"):
            return v
        if v.startswith(("etcd://", "etcds://")):
            from supervisor_service.store import parse_endpoints

            parse_endpoints(v)
            return v
        from supervisor_service.store import is_postgres, redact
        from supervisor_service.store.postgres import parse_url

        if is_postgres(v):
            parse_url(v)
            return v
        raise ValueError("expected sqlite, memory, etcd://host:port[,host:port] or "
                         f"postgresql://user@host:port/dbname, got {redact(v)!r}")

    @field_validator("store_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or "//" in v or "\x00" in v:  # NUL: not a PostgreSQL text
            raise ValueError(f"expected an absolute key prefix like /region-supervisor/cluster-a, got {v!r}")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        self.detector_options()  # raises ValueError naming the option
        from supervisor_service.security.tls_settings import check_tls_settings

        check_tls_settings(self)  # raises ValueError naming the setting and the file
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    def _values_of(self, cls: type) -> dict[str, Any]:
        """The settable fields of the option dataclass `cls`, from their settings, by field name."""
        return {f.name: getattr(self, setting) for f, setting, _ in settable_fields(cls)}

    def detector_options(self) -> PhiAccrualOptions:
        return PhiAccrualOptions(**self._values_of(PhiAccrualOptions))

    def failover_policy(self) -> FailoverPolicy:
        values = self._values_of(FailoverPolicy)
        if not self.guards_enabled:
            values["failover_count_decay_ms"] = 0
        return FailoverPolicy(
            # A remote Selector or RegionMigration must be given targets it can reach.
            require_target_addr=bool(self.selector_endpoint or self.region_migration_endpoint),
            # The embedded dry run moves nothing: a target it "succeeded" to never reports the regions.
            watch_target_on_success=bool(self.region_migration_endpoint),
            **values,
        )

    def guard_settings(self) -> GuardSettings | None:
        if not self.guards_enabled:
            return None
        values = self._values_of(GuardSettings)
        # Silence must be noticed before conviction, whatever the detector settings.
        values["mass_failure_silence_ms"] = min(
            self.mass_failure_silence_ms, int(self.acceptable_heartbeat_pause_ms // 2)
        )
        return GuardSettings(**values)

    @property
    def selector_alive_window(self) -> int:
        """The embedded Selector's alive window in ms: its setting, or the acceptable heartbeat pause."""
        return self.selector_alive_window_ms or int(self.acceptable_heartbeat_pause_ms)

    @property
    def advertised(self) -> str:
        return self.advertise_addr or self.grpc_addr


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; raises ConfigError naming each bad setting and where it is set."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
    from supervisor_service.security.client_env import CLIENT_TLS_ENV  # a client's, not the service's

    unknown = sorted(
        k for k in os.environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in Settings.model_fields
        and k not in CLIENT_TLS_ENV.values()
    )
    if unknown:
        raise ConfigError("; ".join(f"unknown environment variable {k}{_did_you_mean(k[len(ENV_PREFIX):])}" for k in unknown))
    try:
        # pydantic-settings reads the TOML path from the class's model_config.
        cls = Settings
        if config_file is not None:
            config = SettingsConfigDict(**{**Settings.model_config, "toml_file": Path(config_file)})
            cls = type("Settings", (Settings,), {"model_config": config, "__doc__": Settings.__doc__})
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # e.g. a malformed TOML file
        raise ConfigError(f"invalid config file {str(config_file)!r}: {exc}") from None


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(Settings.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown setting {name!r}{_did_you_mean(name)} (`supervisor-service settings` lists them)")
            continue
        env = f"SUPERVISOR_{name.upper()}" if err["loc"] else ""
        where = f"{name} ({env})" if env else name
        message = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        if name == "store" and isinstance(shown, str):
            from supervisor_service.store import redact

            shown = redact(shown)  # a PostgreSQL URL's password
        problems.append(f"{where}: {message} (got {shown!r})")
    return "invalid settings: " + "; ".join(problems)


def default_text(default: Any) -> str:
    """A default as the operator writes it (a relative path keeps its `./`)."""
    if isinstance(default, Path) and not default.is_absolute():
        return f"./{default}"
    return str(default)


def settings_table_markdown() -> str:
    """The README configuration table, from the field descriptions."""
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = default_text(field.default)
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        lines.append(f"| `SUPERVISOR_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(lines)
