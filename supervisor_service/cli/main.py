"""`supervisor-service`: run the service and operate it.

    supervisor-service serve [--config FILE] [--grpc-addr ...]
    supervisor-service dump [--datanode ID ...] [--only-failed] [--at MILLIS] [--json]
    supervisor-service maintenance on|off|status [--datanode ID ...] [--ttl SECONDS] [--reason TEXT]
    supervisor-service hold status|release [--reason TEXT]
    supervisor-service audit [--since WHEN] [--identity NAME] [--limit N] [--json]
    supervisor-service journal [--limit N] [--json]
    supervisor-service drain start|status|cancel [ID ...] [--reason TEXT]   (cli/planned.py)
    supervisor-service policy set|list [TABLE ...] [--failover on|off] [--priority N]
    supervisor-service history|explain|whatif ... (cli/insight.py)
    supervisor-service demo [--datanodes N] [--kill-after S] [--duration S]
    supervisor-service settings [--markdown]
    supervisor-service health [--addr HOST:PORT] [--timeout S] [--service NAME]
    supervisor-service evaluate [--config FILE] [--trace FILE.csv ...] [--out DIR] [--quick]
    supervisor-service certs --out DIR [--datanodes N] [--operator NAME ...]

Client commands take `--addr` with one or more replicas (`--addr a,b,c` or
repeated) and, for a TLS port, `--tls-ca`, `--tls-cert`, `--tls-key`,
`--tls-server-name` (`cli/tls.py`). Errors are one line on stderr and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from supervisor_service.cli.audit import add_audit_flags, add_reason, run_audit
from supervisor_service.cli.planned import add_planned_commands, run_planned
from supervisor_service.cli.tls import add_certs_parser, add_tls_flags, certs_command, client_tls

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away
EXIT_NOT_SERVING = 1  # `health`: the service answered, and not SERVING (what a container HEALTHCHECK counts as unhealthy)

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1

# The settings `serve` also takes as a flag (`grpc_addr` is `--grpc-addr`); each flag's type and help
# come from its setting's field, so they say what the README's configuration table says.
_SERVE_FLAGS = (
    "grpc_addr",
    "metrics_addr",
    "selector_endpoint",
    "peer_lookup_endpoint",
    "region_migration_endpoint",
    "tick_interval_ms",
    "phi_threshold",
    "heartbeat_clock",
    "log_level",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, like every other error of the CLI.

    `add_flags(parser)`, if given, adds the parser's flags when it first parses: `serve`'s and
    `evaluate`'s come from the settings and the evaluation, imports the other commands do without.
    """

    def __init__(self, *args, add_flags=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._add_flags = add_flags

    def parse_known_args(self, args=None, namespace=None):
        if self._add_flags is not None:
            add_flags, self._add_flags = self._add_flags, None
            add_flags(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"supervisor-service: error: {message} (see `{self.prog} --help`)\n")


def _int_in(low: int, high: int, what: str):
    """An argparse type: an integer in low..high (what a protobuf field or the code can hold)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {text}")
        return value

    return parse


def _finite(low: float, high: float, what: str):
    """An argparse type: a finite number with low < value <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not low < value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} (more than {low:g}, at most {high:g}), got {text}")
        return value

    return parse


_DATANODE = _int_in(0, UINT64_MAX, "a datanode id")


def _ttl_millis(text: str) -> int:
    """--ttl SECONDS as whole milliseconds, rounded up (never shorter than asked); 0 is no expiry.
    Below a millisecond (the resolution) is refused rather than silently meaning "no expiry"."""
    try:
        seconds = Decimal(text.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not seconds.is_finite() or seconds < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    if seconds == 0:
        return 0
    if seconds < Decimal("0.001"):
        raise argparse.ArgumentTypeError(
            f"{text} s is below a millisecond, the resolution of a TTL (0: no expiry)")
    millis = int((seconds * 1000).to_integral_value(rounding=ROUND_CEILING))
    from supervisor_service.proto import MAX_MAINTENANCE_TTL_MS  # what the service accepts (ttl_millis)

    if millis > MAX_MAINTENANCE_TTL_MS:
        raise argparse.ArgumentTypeError(f"{text} s is too long: at most {MAX_MAINTENANCE_TTL_MS // 1000} s")
    return millis


def _addr_list(text: str) -> list[str]:
    addrs = [a.strip() for a in text.split(",") if a.strip()]
    if not addrs:
        raise argparse.ArgumentTypeError(f"expected host:port[,host:port...], got {text!r}")
    return addrs


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _add_setting_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """`--name` for setting `name`: unset unless given, so that it overrides the other sources only then."""
    from supervisor_service.app.settings import ENV_PREFIX, Settings, default_text

    field = Settings.model_fields[name]
    default = default_text(field.default) or "(empty)"
    text = f"{field.description} Default: {default} (also {ENV_PREFIX}{name.upper()})."
    # A '%' would be read by argparse as a format.
    parser.add_argument(_flag(name), type=field.annotation if field.annotation in (int, float) else str,
                        help=text.replace("%", "%%"))


def _serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", metavar="FILE", help="TOML file of settings (names as in the README, lower case)")
    for name in _SERVE_FLAGS:
        _add_setting_flag(serve, name)
    serve.add_argument(
        "--new-store", dest="allow_new_store", action="store_const", const=True, default=None,
        help="begin from an empty state although data_dir held a store whose database is missing (setting allow_new_store)",
    )


def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
    import supervisor_service.evaluate as ev

    parser.add_argument("--config", metavar="FILE", help="TOML file of settings to evaluate (default: the defaults "
                        "and SUPERVISOR_* variables)")
    parser.add_argument("--trace", action="append", default=[], metavar="FILE.csv",
                        help="a recorded trace of datanode_id,region_id,timestamp_ms rows, instead of the generated "
                        "ones (repeatable)")
    trace = ev.TraceConfig()  # the defaults of the generated traces
    parser.add_argument("--datanodes", type=int, default=trace.datanodes,
                        help=f"datanodes per generated trace (default {trace.datanodes})")
    parser.add_argument("--regions", type=int, default=trace.regions,
                        help=f"regions per datanode (default {trace.regions})")
    parser.add_argument("--interval-ms", type=int, default=trace.interval_ms,
                        help=f"heartbeat interval of the datanodes (default {trace.interval_ms})")
    parser.add_argument("--hours", type=float, default=trace.hours,
                        help=f"simulated hours per trace (default {trace.hours:g})")
    parser.add_argument("--seed", type=int, default=trace.seed,
                        help=f"seed of the generated traces (default {trace.seed})")
    thresholds = ",".join(f"{t:g}" for t in ev.DEFAULT_THRESHOLDS)
    parser.add_argument("--thresholds", default=thresholds, metavar="LIST",
                        help=f"phi thresholds of the sweep (default {thresholds})")
    pauses = ",".join(f"{p / 1000:g}" for p in ev.DEFAULT_PAUSES_MS)
    parser.add_argument("--pauses", default=pauses, metavar="LIST",
                        help=f"acceptable heartbeat pauses of the sweep, seconds (default {pauses})")
    parser.add_argument("--quick", action="store_true", help="a quarter of an hour per trace and a smaller sweep")
    parser.add_argument("--processes", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--out", default=".", metavar="DIR", help="where to write the report (default: .)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="supervisor-service",
        description="Region failover supervisor: detects failed datanodes by phi-accrual and fails their "
        "regions over. Settings come from flags, SUPERVISOR_* environment variables and an optional TOML file "
        "(`supervisor-service settings` lists them all).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the service (until SIGTERM or SIGINT)", add_flags=_serve_flags)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument(
            "--addr",
            type=_addr_list,
            action="append",
            metavar="HOST:PORT[,...]",
            help="the service's gRPC address; several replicas comma-separated or repeated: the leader is found "
            "among them (default: $SUPERVISOR_GRPC_ADDR, else the default of the setting grpc_addr)",
        )
        c.add_argument("--token", default=os.environ.get("SUPERVISOR_AUTH_TOKEN", ""),
                       help="auth token, if the service requires one (default: $SUPERVISOR_AUTH_TOKEN)")
        c.add_argument("--timeout", type=_finite(0, 86_400, "seconds"), default=10.0,
                       help="seconds to wait for each replica's answer (default 10)")
        add_tls_flags(c)
        return c

    dump = client("dump", "show the detectors: phi, last heartbeat, failover count")
    dump.add_argument("--datanode", type=_DATANODE, action="append", default=[], metavar="ID",
                      help="only this datanode (repeatable)")
    dump.add_argument("--only-failed", action="store_true", help="only detectors at or above the threshold")
    dump.add_argument("--at", type=_int_in(0, INT64_MAX, "a time in milliseconds since the epoch"), default=0,
                      metavar="MILLIS", help="evaluate phi at this time (default: now)")
    dump.add_argument("--json", action="store_true", help="one JSON object per detector")

    maint = client("maintenance", "turn maintenance mode (no failover) on or off, globally or per datanode, or show it")
    maint.add_argument("action", choices=["on", "off", "status"])
    maint.add_argument("--datanode", type=_DATANODE, action="append", default=[], metavar="ID",
                       help="only this datanode (repeatable); default: the global switch")
    maint.add_argument("--ttl", type=_ttl_millis, default=0, metavar="SECONDS", dest="ttl_millis",
                       help="with `on`: turn itself off after this long (a forgotten switch must not disable failover "
                       "forever); at least 0.001, fractions of a millisecond rounded up")
    add_reason(maint)

    hold = client("hold", "show why failover is held, or release a mass-failure hold")
    hold.add_argument("action", choices=["status", "release"])
    add_reason(hold)
    add_audit_flags(client("audit", "show the audit trail: who changed what and why, and the refused calls"))

    journal = client("journal", "list the decisions recorded by the embedded dry-run RegionMigration")
    journal.add_argument("--limit", type=_int_in(1, UINT32_MAX, "a number of entries"), default=100,
                         help="newest N entries (default 100)")
    journal.add_argument("--json", action="store_true", help="one JSON object per entry")
    add_planned_commands(client, _int_in)  # drain, policy (cli/planned.py)

    import supervisor_service.cli.demo as demo
    import supervisor_service.cli.insight as insight

    insight.add_commands(client, _int_in)
    demo.add_command(sub)

    health = sub.add_parser(
        "health",
        help="ask the service's grpc.health.v1 Check: exit 0 only when SERVING",
        description="Asks grpc.health.v1 Check of one replica and prints the status (SERVING, NOT_SERVING, "
        "UNKNOWN, SERVICE_UNKNOWN). Exit status: 0 SERVING; 1 the service answered, not SERVING (or does not know "
        "the service name yet); 69 no answer: nothing listens, not a gRPC server, no health service, or no answer "
        "within --timeout. The container image's HEALTHCHECK runs it.",
    )
    health.add_argument("--addr", metavar="HOST:PORT",
                        help="the replica's gRPC address; a wildcard host (0.0.0.0, [::]) is asked on the loopback "
                        "(default: $SUPERVISOR_GRPC_ADDR, else the default of the setting grpc_addr)")
    health.add_argument("--timeout", type=_finite(0, 86_400, "seconds"), default=5.0,
                        help="seconds to wait for the answer (default 5)")
    health.add_argument("--service", default=None, metavar="NAME",
                        help="the health service name to check (default: supervisor.v1.RegionSupervisor; '' is the "
                        "whole server)")
    health.add_argument("--token", default=os.environ.get("SUPERVISOR_AUTH_TOKEN", ""),
                        help="auth token sent along (health checks are exempt from auth_token; for a proxy in "
                        "between) (default: $SUPERVISOR_AUTH_TOKEN)")
    add_tls_flags(health)
    add_certs_parser(sub)

    settings = sub.add_parser("settings", help="list every setting with its default and meaning")
    settings.add_argument("--markdown", action="store_true", help="as the README's markdown table")

    sub.add_parser(
        "evaluate",
        help="replay heartbeat traces through the supervisor on a simulated clock and report detection quality",
        description="Replays heartbeat traces (generated from a seed, or recorded CSV files) through the real "
        "detector table, guards and failover rules on a simulated clock, with guards on and off, and reports "
        "detection time T_D, false failovers per hour per datanode, query accuracy P_A and failovers, for the "
        "settings in effect and for a sweep of the phi threshold and the acceptable heartbeat pause. Writes "
        "DIR/detection-quality.md (and .png with matplotlib installed: pip install 'supervisor-service[plot]'). "
        "Exits 1 when a check of the report fails.",
        add_flags=_evaluate_flags,
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        match args.command:
            case "serve":
                code = _serve(args)
            case "settings":
                code = _settings(args)
            case "evaluate":
                code = _evaluate(args, argv)
            case "health":
                code = _health(args)
            case "certs":
                code = certs_command(args)
            case "demo":
                import supervisor_service.cli.demo as demo

                code = demo.run(args)
            case _:
                code = _client_command(args)
        sys.stdout.flush()  # here, so that a reader gone away is seen here and not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): nothing to say. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _fail(message: str, code: int) -> int:
    print(f"supervisor-service: error: {message}", file=sys.stderr)
    return code


def _settings(args) -> int:
    from supervisor_service.app.settings import Settings, default_text, settings_table_markdown

    if args.markdown:
        print(settings_table_markdown())
        return 0
    for name, field in Settings.model_fields.items():
        line = f"SUPERVISOR_{name.upper():<40} {default_text(field.default)}"
        if name == "data_dir":
            # Resolved against the working directory when the service starts: say where that is here.
            here = os.environ.get("SUPERVISOR_DATA_DIR") or str(field.default)
            line += f"  (here: {os.path.abspath(os.path.expanduser(here))})"
        print(line)
    return 0


def _float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{what}: expected positive numbers, got {text!r}")
    return values


def _evaluate(args, argv: Sequence[str] | None) -> int:
    from pathlib import Path

    import supervisor_service.evaluate as ev
    from supervisor_service.app.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        thresholds = _float_list(args.thresholds, "--thresholds")
        pauses = [p * 1000 for p in _float_list(args.pauses, "--pauses")]
        if args.quick:
            # Three thresholds at the default pause only (evaluate always adds the default point).
            thresholds, pauses = [t for t in thresholds if t in (2, 8, 16)] or thresholds[:2], []
        for name in ("datanodes", "regions", "interval_ms", "hours"):
            value = getattr(args, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if args.datanodes < 3:
            raise ValueError("--datanodes must be at least 3 (failover needs somewhere to go)")
        cfg = ev.TraceConfig(datanodes=args.datanodes, regions=args.regions, interval_ms=args.interval_ms,
                             hours=0.25 if args.quick else args.hours, seed=args.seed)
        if args.trace:
            traces, cfg = [ev.load_csv(path) for path in args.trace], None
        else:
            traces = [ev.generate(kind, cfg) for kind in ev.TRACE_KINDS]
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except (ValueError, OSError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    command = "supervisor-service " + " ".join(sys.argv[1:] if argv is None else argv)
    report = ev.evaluate(settings, traces, cfg=cfg, thresholds=thresholds, pauses_ms=pauses,
                         processes=args.processes, command=command)
    md, png = ev.write_report(report, Path(args.out))
    print(report.markdown(None), end="")
    print(f"\nwrote {md}" + (f" and {png}" if png else " (no plot: matplotlib is not installed; "
                                                        "pip install 'supervisor-service[plot]')"))
    return 0 if all(ok for _, ok, _ in report.checks) else 1


def _serve(args) -> int:
    from supervisor_service.app.logging import configure_logging
    from supervisor_service.app.service import Service
    from supervisor_service.app.settings import ConfigError, load_settings

    overrides = {name: getattr(args, name) for name in _SERVE_FLAGS}
    overrides["allow_new_store"] = args.allow_new_store
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    configure_logging(settings.log_level, None if settings.log_format == "auto" else settings.log_format == "json")
    from prometheus_client import REGISTRY

    from supervisor_service.store import StoreError

    async def run() -> int:
        try:
            service = Service(settings, registry=REGISTRY)
        except StoreError as exc:
            return _fail(str(exc), EXIT_UNAVAILABLE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.request_stop)
        try:
            await service.start()
        except (OSError, StoreError) as exc:
            await service.stop()
            # Let grpc.aio finalize its server while the event loop is still alive; otherwise
            # interpreter shutdown prints a spurious "Error in sys.excepthook".
            service.server = None
            gc.collect()
            return _fail(str(exc), EXIT_UNAVAILABLE)
        return await service.wait()

    return asyncio.run(run())


BAD_TOKEN = "--token: expected printable ASCII without spaces (what an authorization header holds)"


def _bad_token(token: str) -> bool:
    """Not what an HTTP/2 header value may hold: grpc would refuse it only at the call, as INTERNAL."""
    return not all("\x21" <= c <= "\x7e" for c in token)


def _client_command(args) -> int:
    import grpc

    from supervisor_service.client import SupervisorClient

    if _bad_token(args.token):
        return _fail(BAD_TOKEN, EXIT_USAGE)
    try:
        tls = client_tls(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    groups = args.addr or [_addr_list(os.environ.get("SUPERVISOR_GRPC_ADDR") or _default_grpc_addr())]
    addrs = [a for group in groups for a in group]
    if args.command == "maintenance" and args.ttl_millis and args.action != "on":
        return _fail("--ttl takes a positive number of seconds, with `on` only", EXIT_USAGE)
    try:
        with SupervisorClient(addrs, token=args.token, timeout=args.timeout, tls=tls) as client:
            match args.command:
                case "dump":
                    return _dump(client, args)
                case "maintenance":
                    if args.action == "status":
                        resp = client.maintenance_status()
                    else:
                        resp = client.set_maintenance_scope(args.action == "on", args.datanode, args.ttl_millis,
                                                            reason=args.reason)
                    _print_maintenance(resp)
                    return 0
                case "hold":
                    resp = client.release_hold(args.reason) if args.action == "release" else client.holds()
                    if args.action == "release":
                        print("mass-failure hold released" if resp.released else "no mass-failure hold was active")
                    print(f"failover held: {', '.join(resp.holds) if resp.holds else 'no'}"
                          f" (failed datanode fraction {resp.failed_datanode_fraction:.2f},"
                          f" answered by the {'leader' if resp.is_leader else 'follower'})")
                    return 0
                case "journal":
                    return _journal(client, args)
                case "drain" | "policy":
                    return run_planned(client, args, _fail, EXIT_USAGE, _int_in)
                case "history" | "explain" | "whatif":
                    import supervisor_service.cli.insight as insight

                    return insight.run(client, args)
                case "audit":
                    return run_audit(client, args)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "UNKNOWN"
        detail = exc.details() or ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            detail = f"cannot reach the service at {','.join(addrs)} ({detail})"
        elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = f"no answer from the service at {','.join(addrs)} within {args.timeout:g} s (--timeout)"
        return _fail(f"{code}: {detail}", EXIT_UNAVAILABLE)
    return EXIT_USAGE


def _health_target(addr: str) -> str:
    """Where to ask for `addr`: the address itself, but a wildcard host (what a server binds to listen
    on every interface, as the container image does) is asked on the loopback."""
    from supervisor_service.app.settings import check_host_port

    check_host_port(addr, allow_empty=False, allow_port_zero=False)
    host, _, port = addr.rpartition(":")
    if host in ("0.0.0.0", "*"):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "[::0]", "[0:0:0:0:0:0:0:0]"):
        return f"[::1]:{port}"
    return addr


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from supervisor_service.app.settings import short_repr
    from supervisor_service.proto import pb
    from supervisor_service.security.tls import channel as channel_to

    if args.addr is not None:
        addr, source = args.addr, "--addr"
    elif os.environ.get("SUPERVISOR_GRPC_ADDR"):
        addr, source = os.environ["SUPERVISOR_GRPC_ADDR"], "SUPERVISOR_GRPC_ADDR (no --addr given)"
    else:
        addr, source = _default_grpc_addr(), "grpc_addr"
    try:
        target = _health_target(addr)
    except ValueError as exc:
        return _fail(f"{source}: {exc}", EXIT_USAGE)
    if _bad_token(args.token):
        return _fail(BAD_TOKEN, EXIT_USAGE)
    try:
        tls = client_tls(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    service = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name if args.service is None else args.service
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    shown = f"{short_repr(service)} at {target}" if service else f"the server at {target}"
    # No reconnect backoff and no retries: one attempt within --timeout, as a probe wants.
    with channel_to(target, tls, [("grpc.enable_retries", 0)]) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                # The health service does not know the name: a service still starting (it sets its name
                # once it has started), or a wrong --service.
                print("SERVICE_UNKNOWN")
                return _fail(f"no health status for {shown} (still starting, or not its name: see --service)",
                             EXIT_NOT_SERVING)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"no answer within {args.timeout:g} s (--timeout)"
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                why = "it answers gRPC but has no grpc.health.v1 service"
            elif code == grpc.StatusCode.UNAVAILABLE:
                why = f"UNAVAILABLE: {exc.details() or 'no details'} (nothing listens there, or it does not speak gRPC)"
            else:
                name = code.name if code else "UNKNOWN"
                why = f"it answered {name}: {short_repr(exc.details() or 'no details', 200)}"
            return _fail(f"cannot check the health of {shown}: {why}", EXIT_UNAVAILABLE)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING


def _default_grpc_addr() -> str:
    """Where the service listens unless told otherwise (the default of the setting grpc_addr)."""
    from supervisor_service.app.settings import Settings

    return Settings.model_fields["grpc_addr"].default


def _print_maintenance(resp) -> None:
    expiry = f" until {resp.expires_at_millis} ms" if resp.enabled and resp.expires_at_millis else ""
    print(f"maintenance mode: {'on' if resp.enabled else 'off'}{expiry}")
    for d in resp.datanodes:
        until = f" until {d.expires_at_millis} ms" if d.expires_at_millis else ""
        print(f"datanode {d.datanode_id}: maintenance on{until}")


def _dump(client, args) -> int:
    from supervisor_service.core import region_label

    header, rows = client.dump(datanode_ids=args.datanode, only_failed=args.only_failed, at_millis=args.at)
    if args.json:
        for r in rows:
            print(json.dumps({
                "datanode_id": r.datanode_id,
                "region_id": r.region_id,
                "region": region_label(r.region_id),
                "last_heartbeat_millis": r.last_heartbeat_millis,
                "phi": r.phi if r.phi != float("inf") else "inf",
                "available": r.available,
                "sample_count": r.sample_count,
                "mean_interval_millis": r.mean_interval_millis,
                "std_deviation_millis": r.std_deviation_millis,
                "failover_count": r.failover_count,
                "migrating": r.migrating,
            }))
        return 0
    print(
        f"# at {header.at_millis} ms, {len(rows)} detectors, leader={'yes' if header.is_leader else 'no'}, "
        f"maintenance={'on' if header.maintenance_mode else 'off'}"
    )
    print(f"{'DATANODE':>9} {'REGION_ID':>20} {'TABLE/REGION':>16} {'PHI':>8} {'AVAIL':>5} "
          f"{'LAST_HB_MS':>14} {'SAMPLES':>7} {'MEAN_MS':>9} {'STD_MS':>8} {'FAILOVERS':>9}")
    for r in rows:
        phi = "inf" if r.phi == float("inf") else f"{r.phi:.2f}"
        flag = "yes" if r.available else "NO"
        if r.migrating:
            flag += "*"
        print(f"{r.datanode_id:>9} {r.region_id:>20} {region_label(r.region_id):>16} {phi:>8} {flag:>5} "
              f"{r.last_heartbeat_millis:>14} {r.sample_count:>7} {r.mean_interval_millis:>9.1f} "
              f"{r.std_deviation_millis:>8.1f} {r.failover_count:>9}")
    return 0


def _journal(client, args) -> int:
    from supervisor_service.core import region_label

    embedded, entries = client.journal(args.limit)
    if not embedded:
        return _fail(
            "the service uses a remote RegionMigration service: `supervisor-service history` lists its decisions",
            EXIT_USAGE,
        )
    for e in entries:
        record = {
            "at_millis": e.at_millis,
            "regions": [region_label(r) for r in e.region_ids],
            "region_ids": list(e.region_ids),
            "from": {"id": e.from_peer.id, "addr": e.from_peer.addr},
            "to": {"id": e.to_peer.id, "addr": e.to_peer.addr},
            "timeout_millis": e.timeout_millis,
            "reason": "FAILOVER",
            "procedure_id": e.procedure_id,
        }
        if args.json:
            print(json.dumps(record))
        else:
            print(f"{e.at_millis}  {e.procedure_id}  datanode {e.from_peer.id} -> {e.to_peer.id}  "
                  f"timeout {e.timeout_millis // 1000}s  regions {','.join(record['regions'])}")
    if not args.json and not entries:
        print("journal is empty: no failover decided yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
