"""The ``presence-core`` command: ``presence-core serve`` (and ``bench``, see `.bench`).

``serve`` runs a `PresenceServer` (in-process presence by default; ``--redis URL`` or
``--redis-cluster URL`` to share it between processes) until SIGTERM or SIGINT, then stops
gracefully: every client is sent away, and the process's presences leave for everyone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
import tomllib
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .. import __version__
from .._validate import is_loopback
from ..errors import PresenceError
from ..limits import Limits
from ..protocol.config import ServerLimits
from ..scaling import LOAD_SIGNALS, Threshold, ThresholdScaler
from ..tracker import Tracker
from . import bench
from .loop import raise_nofile, run
from .server import PresenceServer

if TYPE_CHECKING:
    from ..auth import JwtVerifier
    from ..store import RedisStore
    from ..typing import Policy

__all__ = ["main", "parse_args"]

logger = logging.getLogger("presence_core.server")

_FD_MARGIN = 32  # descriptors besides the clients': listening sockets, Redis, logs, imports

_ENV_PREFIX = "PRESENCE_CORE_"
# --redis reads these after $PRESENCE_CORE_REDIS, the first one set winning.
_REDIS_ENV = ("PRESENCE_CORE_REDIS_URL", "REDIS_URL")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the audit fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _parser() -> argparse.ArgumentParser:
    """The ``presence-core`` parser with the built-in defaults only: `parse_args` adds the
    environment and the --config file."""
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``presence-core`` parser and its ``serve`` subparser."""
    parser = argparse.ArgumentParser(prog="presence-core", description="presence-core")
    parser.add_argument("--version", action="version", version=f"presence-core {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve presence to Phoenix / Supabase Realtime clients over WebSockets",
        description="Serve presence to phoenix.js, realtime-js and Supabase's Python client. "
        "WebSockets at any path ending in /websocket; GET /health, GET /metrics and the "
        "live dashboard at GET /.",
        epilog="Every option can also be set by an environment variable named after it, "
        "PRESENCE_CORE_<OPTION> (PRESENCE_CORE_JWT_SECRET, PRESENCE_CORE_PORT, "
        "PRESENCE_CORE_ALLOW_ANONYMOUS=true...; --redis also reads $PRESENCE_CORE_REDIS_URL "
        "and $REDIS_URL; an empty variable counts as unset), or in a TOML file given by "
        "--config (keys are the options' long names, optionally under a [serve] table). The "
        "command line wins over the environment, which wins over the file. Secrets passed in "
        "the environment or the file stay out of ps.",
    )
    _add_serve_options(serve)
    bench.add_parser(commands)
    return parser, serve


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from this TOML file (keys: the long option names, with dashes or "
        "underscores, optionally under [serve])",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1); an address other than loopback needs "
        "authentication (--jwt-secret, --jwks, --policy) or --allow-anonymous",
    )
    serve.add_argument("--port", type=_port, default=4000, help="port to listen on (4000)")
    serve.add_argument(
        "--connection-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a connection that sends nothing for this long leaves (60)",
    )
    serve.add_argument("--node", default=None, help="this process's node name (random)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--redis",
        metavar="URL",
        help="share presence through this Redis; default: $PRESENCE_CORE_REDIS_URL, else "
        "$REDIS_URL, which keep a password in the URL out of ps",
    )
    where.add_argument(
        "--redis-cluster", metavar="URL", help="share presence through this Redis Cluster"
    )
    serve.add_argument(
        "--redis-password",
        metavar="PASSWORD",
        help="the password for --redis or --redis-cluster (it replaces one in the URL); "
        "prefer $PRESENCE_CORE_REDIS_PASSWORD, which keeps it out of ps",
    )
    serve.add_argument("--prefix", default="presence", help="Redis key prefix (presence)")
    serve.add_argument(
        "--liveness-timeout",
        type=float,
        default=9.0,
        metavar="SECONDS",
        help="with Redis: a process not heard of for this long is dead, and its presences "
        "leave everywhere within about this plus a ninth of it (9)",
    )
    auth = serve.add_argument_group(
        "authentication",
        "Without --jwt-secret, --jwks or --policy nothing is authenticated: serve then "
        "listens on loopback only, unless --allow-anonymous.",
    )
    auth.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help="verify clients' JWTs (HS256/384/512) with this secret, e.g. Supabase's legacy JWT "
        "secret; prefer $PRESENCE_CORE_JWT_SECRET, which keeps it out of ps",
    )
    auth.add_argument(
        "--jwks",
        metavar="FILE",
        help="verify clients' JWTs (RS*, PS*, ES*, EdDSA) with the public keys of this JSON "
        "Web Key Set file, picked by kid (e.g. Supabase's "
        "https://<project>.supabase.co/auth/v1/.well-known/jwks.json, downloaded)",
    )
    auth.add_argument(
        "--jwt-audience", metavar="AUD", help="tokens' aud must contain this (not checked)"
    )
    auth.add_argument("--jwt-issuer", metavar="ISS", help="tokens' iss must be this (not checked)")
    auth.add_argument(
        "--presence-key-claim",
        metavar="CLAIM",
        help="a client's presence key is this claim of its token (e.g. sub): a join without a "
        "key gets it, a track under another key is refused (needs a JWT key)",
    )
    auth.add_argument(
        "--policy",
        metavar="MODULE:CALLABLE",
        help="decides what private channels (config.private: true) allow, per topic and "
        "token: a callable (claims, topic) -> presence_core.Access, imported from the current "
        "directory or the installed packages (without one, private channels are refused)",
    )
    auth.add_argument(
        "--private-only",
        action="store_true",
        help="refuse public channels (needs a JWT key)",
    )
    auth.add_argument(
        "--allowed-origins",
        action="extend",
        type=_origins,
        metavar="ORIGIN[,ORIGIN...]",
        help="refuse browser handshakes (403) from other origins, e.g. "
        "https://app.example.com (repeatable; default: any)",
    )
    auth.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve without authentication on an address other than loopback; with a JWT "
        "key, let in a handshake that carries no token",
    )
    defaults = ServerLimits()
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections)
    serve.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=defaults.max_connections_per_ip,
        metavar="N",
        help="open WebSockets one client address may hold (default: no limit, since behind a "
        "proxy or load balancer every client has the proxy's address)",
    )
    serve.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes)
    serve.add_argument("--max-topics", type=int, default=defaults.max_topics_per_connection)
    serve.add_argument("--joins-per-second", type=float, default=defaults.joins_per_second)
    serve.add_argument(
        "--broadcasts-per-second", type=float, default=defaults.broadcasts_per_second
    )
    serve.add_argument(
        "--messages-per-second",
        type=float,
        default=defaults.messages_per_second,
        help="frames a socket may send a second, of any kind; past them the server stops "
        f"reading it for a while ({defaults.messages_per_second:g})",
    )
    serve.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=defaults.max_buffered_bytes,
        help="unread bytes a client may have waiting before it is cut as too slow",
    )
    plan = Limits()
    serve.add_argument(
        "--presence-rate", type=float, default=plan.rate_per_second, help="tracks/s per socket"
    )
    serve.add_argument("--presence-burst", type=int, default=plan.burst)
    serve.add_argument("--max-meta-bytes", type=int, default=plan.max_meta_bytes)
    serve.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not serve the live dashboard at / (see --dashboard-token to keep it)",
    )
    serve.add_argument(
        "--dashboard-token",
        metavar="TOKEN",
        help="the dashboard's JSON answers only requests carrying this token (open the page "
        "as /?token=TOKEN); needed to read it at all once auth is on or the address is not "
        "loopback; prefer $PRESENCE_CORE_DASHBOARD_TOKEN, which keeps it out of ps",
    )
    serve.add_argument(
        "--scale",
        action="append",
        type=_threshold,
        default=[],
        metavar="SIGNAL=DOWN:UP",
        help="consult a threshold scaler on this signal (repeatable): ask for more replicas "
        "above UP, allow fewer below DOWN; e.g. connections=5000:20000 or diff_p99_ms=20:75. "
        f"Signals: {', '.join(LOAD_SIGNALS)}.  Decisions are logged and shown on the "
        "dashboard, never acted on",
    )
    serve.add_argument(
        "--scale-max-replicas", type=int, default=10, help="the scaler's ceiling (10)"
    )
    serve.add_argument("--scale-min-replicas", type=int, default=1, help="its floor (1)")
    serve.add_argument(
        "--scale-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between two scaler consultations (15)",
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, answer /health/ready with 503 for this long while still serving "
        "everyone, so a load balancer stops sending new clients first (0; a second SIGTERM "
        "or SIGINT stops at once)",
    )
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        default="info",
        metavar="LEVEL",
        help=f"{', '.join(_LOG_LEVELS)} (info)",
    )


def _options(serve: argparse.ArgumentParser) -> list[argparse.Action]:
    """``serve``'s options (all but --help)."""
    return [a for a in serve._actions if a.option_strings and a.dest != "help"]


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """The command line, ``serve``'s options completed from ``environ`` (`os.environ` by
    default) and the --config file: command line > environment > file > built-in default.

    Exits 2 with argparse's ``presence-core serve: error: ...`` on a bad value from any of them.
    """
    parser, serve = _parsers()
    defaults = {a.dest: a.default for a in _options(serve)}
    for action in _options(serve):  # so that what the command line gives is all there is
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    if given["command"] != "serve":
        return argparse.Namespace(**given)
    if environ is None:
        environ = os.environ
    actions = {a.dest: a for a in _options(serve) if a.dest != "config"}
    values: dict[str, Any] = {dest: defaults[dest] for dest in actions}
    level = dict.fromkeys(actions, 0)
    config = given.get("config") or environ.get("PRESENCE_CORE_CONFIG") or None
    if config is not None:
        for dest, (where, raw) in _read_config(serve, config, actions).items():
            values[dest], level[dest] = _convert(serve, actions[dest], raw, where), 1
    for dest, action in actions.items():
        for name in _env_names(dest):
            text = environ.get(name)
            if text:  # empty counts as unset, so an env file can leave a value out
                values[dest], level[dest] = _convert(serve, action, text, f"${name}"), 2
                break
    for dest in actions.keys() & given.keys():
        values[dest], level[dest] = given[dest], 3
    # One of --redis and --redis-cluster: the one given at the higher level (--redis-cluster
    # on the command line over $REDIS_URL), --redis-cluster at the same level.
    if values["redis"] and values["redis_cluster"]:
        loser = "redis_cluster" if level["redis"] > level["redis_cluster"] else "redis"
        values[loser] = None
    args = argparse.Namespace(command="serve", config=config, **values)
    if args.allowed_origins == []:
        args.allowed_origins = None
    if args.redis_password:
        url, cluster = redis_target(args)
        if not url:
            serve.error("--redis-password needs --redis or --redis-cluster (or $REDIS_URL)")
        try:
            with_secret = with_password(url, args.redis_password)
        except ValueError:  # the URL's own text may hold a password: not repeated here
            serve.error("--redis-password: the Redis URL cannot be parsed")
        setattr(args, "redis_cluster" if cluster else "redis", with_secret)
    return args


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535 (an argparse type)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not between 0 and 65535")
    return port


def _env_names(dest: str) -> tuple[str, ...]:
    """The environment variables an option reads, the first set one winning."""
    own = _ENV_PREFIX + dest.upper()
    return (own, *_REDIS_ENV) if dest == "redis" else (own,)


def _read_config(
    serve: argparse.ArgumentParser, path: str, actions: Mapping[str, argparse.Action]
) -> dict[str, tuple[str, object]]:
    """The options a TOML file sets: dest -> (where, value)."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        serve.error(f"--config {path}: {exc.strerror or type(exc).__name__}")
    except tomllib.TOMLDecodeError as exc:  # its message gives the position, not the text
        serve.error(f"--config {path}: not valid TOML: {exc}")
    except UnicodeDecodeError:
        serve.error(f"--config {path}: not UTF-8")
    entries = [(k, v) for k, v in document.items() if k != "serve"]
    section = document.get("serve")
    if section is not None:
        if not isinstance(section, dict):
            serve.error(f"--config {path}: serve must be a table ([serve])")
        entries += section.items()
    found: dict[str, tuple[str, object]] = {}
    for key, raw in entries:
        dest = key.replace("-", "_")
        if dest not in actions:
            serve.error(
                f"--config {path}: unknown option {key!r} (keys are serve's long option "
                "names, such as jwt-secret or max_connections)"
            )
        if dest in found:
            serve.error(f"--config {path}: {key!r} is given twice")
        if raw != "":  # empty counts as unset, as in the environment
            found[dest] = (f"--config {path}: {key}", raw)
    return found


def _convert(
    serve: argparse.ArgumentParser, action: argparse.Action, raw: object, where: str
) -> object:
    """An environment or file value as the command line would give it; exits 2 if it is not
    one.  Only the value of an option with a type or choices is quoted back, never a secret."""
    if action.nargs == 0:  # a flag
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        shown = repr(raw) if isinstance(raw, str) else f"a {type(raw).__name__}"
        serve.error(f"{where}: expected true or false (1/true/yes/on, 0/false/no/off), not {shown}")
    if isinstance(action, argparse._AppendAction):  # a list; "extend" is one too
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            serve.error(f"{where}: expected a string or a list of strings")
        out: list[object] = []
        for item in items:
            if item.strip():
                value = _typed(serve, action, item.strip(), where)
                out.extend(value) if isinstance(value, list) else out.append(value)
        return out
    if (
        isinstance(raw, int | float)
        and not isinstance(raw, bool)
        and action.type in (int, float, _port)
    ):
        raw = str(raw)  # then int() refuses a float for an int option
    if not isinstance(raw, str):
        serve.error(f"{where}: expected a string, not a {type(raw).__name__}")
    return _typed(serve, action, raw, where)


def _typed(
    serve: argparse.ArgumentParser, action: argparse.Action, text: str, where: str
) -> object:
    convert = cast("Callable[[str], object] | None", action.type)
    try:
        value = text if convert is None else convert(text)
    except argparse.ArgumentTypeError as exc:
        serve.error(f"{where}: {exc}")
    except (TypeError, ValueError):
        name = getattr(convert, "__name__", "")
        serve.error(f"{where}: invalid {name} value: {text!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        serve.error(f"{where}: invalid choice: {text!r} (choose from {choices})")
    return value


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its password (percent-encoded; redis-py decodes it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        pairs = [(k, v) for k, v in pairs if k != "password"] + [("password", password)]
        return f"unix://{parts.netloc}{parts.path}?{urllib.parse.urlencode(pairs)}"
    user, at, host = parts.netloc.rpartition("@")
    user = user.partition(":")[0] if at else ""
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _origins(text: str) -> list[str]:
    """``ORIGIN[,ORIGIN...]`` as a list of origins (an argparse type)."""
    origins = []
    for item in text.split(","):
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not an origin such as https://app.example.com"
            )
        origins.append(origin)
    return origins


def auth_on(args: argparse.Namespace) -> bool:
    """Whether ``serve`` authenticates clients: a JWT key or a policy is configured."""
    return bool(args.jwt_secret or args.jwks or args.policy)


def _check_security(serve: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 on options that would serve less safely than they seem to."""
    if not (args.jwt_secret or args.jwks):
        for dest in ("presence_key_claim", "private_only", "jwt_audience", "jwt_issuer"):
            if getattr(args, dest):
                option = "--" + dest.replace("_", "-")
                serve.error(
                    f"{option} needs a JWT key to check tokens with: pass --jwt-secret or --jwks"
                )
    if not auth_on(args) and not args.allow_anonymous and not is_loopback(args.host):
        serve.error(
            f"refusing to listen on {args.host or 'every address'} without authentication: "
            "pass --jwt-secret or --jwks (and --presence-key-claim sub) to verify clients, or "
            "--allow-anonymous to serve anyone who can reach the port"
        )


def _auth_parts(
    serve: argparse.ArgumentParser, args: argparse.Namespace, redact: Redactor
) -> tuple[JwtVerifier | None, Policy | None]:
    """The verifier and the policy the options ask for; exits 2 if one cannot be built."""
    verifier = policy = None
    if args.jwt_secret or args.jwks:
        from ..auth import JwtVerifier

        try:
            if args.jwks:
                verifier = JwtVerifier.from_jwks_file(
                    args.jwks,
                    secret=args.jwt_secret,
                    audience=args.jwt_audience,
                    issuer=args.jwt_issuer,
                )
            else:
                verifier = JwtVerifier(
                    secret=args.jwt_secret, audience=args.jwt_audience, issuer=args.jwt_issuer
                )
        except Exception as exc:  # a bad key or file: a configuration error
            option = "--jwks" if args.jwks else "--jwt-secret"
            serve.error(redact(f"{option}: {exc}"))
    if args.policy:
        from ..auth import load_policy

        # As `python -m` and uvicorn do: a policy module may sit in the current directory
        # (the presence-core script's own directory is the first entry of sys.path instead).
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            policy = load_policy(args.policy)
        except Exception as exc:  # the module runs its own code: anything may go wrong
            serve.error(redact(f"--policy {args.policy}: {exc}"))
    return verifier, policy


class Redactor:
    """Replaces the secrets ``serve`` was given (and their encoded forms) by ``***`` in a text.

    The last line of defence, applied to every log line and error message: the code never
    formats a secret into one knowingly.  Secrets shorter than 4 characters are left alone,
    since replacing them would mangle ordinary text.
    """

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= 4:
                forms |= {
                    secret,
                    # A secret from argv may hold undecodable bytes as surrogate escapes.
                    urllib.parse.quote(secret, safe="", errors="surrogateescape"),
                    urllib.parse.quote_plus(secret, errors="surrogateescape"),
                    json.dumps(secret)[1:-1],
                    json.dumps(secret, ensure_ascii=False)[1:-1],
                }
        self._forms = sorted(forms, key=len, reverse=True)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Redactor:
        secrets = [args.jwt_secret, args.dashboard_token, args.redis_password]
        for url in (args.redis, args.redis_cluster):
            secrets += _url_passwords(url) if url else []
        return cls(secrets)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, "***")
        return text


def _url_passwords(url: str) -> list[str | None]:
    """The password in a URL's user part and in its query, as written and decoded."""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [parts.password]
    except ValueError:
        return [url]  # unparsable, yet it may hold a secret: the whole URL is one
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if k == "password"]
    return [*found, *(urllib.parse.unquote(p) for p in found if p)]


class _RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, redact: Redactor) -> None:
        super().__init__()
        self._inner = inner
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    serve = _parsers()[1]
    _check_security(serve, args)
    redact = Redactor.of(args)
    verifier, policy = _auth_parts(serve, args, redact)
    handler = logging.StreamHandler(sys.stderr)
    inner = (
        JsonFormatter()
        if args.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    handler.setFormatter(_RedactingFormatter(inner, redact))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    # One line per health check or refused handshake is noise; the audit log has what matters.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    _raise_open_files(args.max_connections)
    try:
        return run(_serve(args, verifier, policy))
    except PresenceError as exc:  # a bad option value, found when the parts are built
        print(redact(f"presence-core serve: error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not this machine's...
        print(redact(f"presence-core serve: error: {exc}"), file=sys.stderr)
        return 1
    except Exception:  # a bug: its traceback, without the secrets
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _raise_open_files(max_connections: int) -> None:
    """Raise the open-files soft limit to the hard one: each client is a descriptor, and the
    usual soft limit of 1,024 would refuse connections long before --max-connections."""
    soft, hard = raise_nofile()
    if soft != resource.RLIM_INFINITY and soft < max_connections + _FD_MARGIN:
        logger.warning(
            "open files limited to %d (hard limit %d): fewer than --max-connections %d "
            "clients can connect; raise the hard limit (ulimit -Hn, LimitNOFILE=, "
            "docker run --ulimit nofile=)",
            soft,
            hard,
            max_connections,
        )


def redis_target(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The Redis URL ``serve`` shares presence through, and whether it is a cluster's.

    --redis-cluster wins (`parse_args` leaves one of them set at most).
    """
    if args.redis_cluster:
        return args.redis_cluster, True
    return args.redis, False


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs.

    redis-py's URL parser, which the store uses, takes the password from the user part
    (``redis://user:pw@host``) or from a ``password`` query argument, so both are redacted.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable, yet it may hold a secret: show the scheme alone
        return url.partition(":")[0] + "://***"
    netloc, query = parts.netloc, parts.query
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(name == "password" for name, _ in pairs):
        redacted = [(name, "***" if name == "password" else value) for name, value in pairs]
        query = urllib.parse.urlencode(redacted, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Built by hand: urlunsplit would write unix:///path as unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _threshold(text: str) -> Threshold:
    """``SIGNAL=DOWN:UP`` as a `Threshold` (an argparse type)."""
    signal_name, _, bounds = text.partition("=")
    down, _, up = bounds.partition(":")
    try:
        return Threshold(signal_name.strip(), float(up), float(down))
    except (ValueError, PresenceError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIGNAL=DOWN:UP ({exc})") from None


def _auth_summary(args: argparse.Namespace) -> str:
    """What the start-up log line says of authentication: the options' names, no secret."""
    parts = []
    if args.jwt_secret:
        parts.append("JWT secret")
    if args.jwks:
        parts.append(f"JWKS {args.jwks}")
    if args.presence_key_claim:
        parts.append(f"presence key = claim {args.presence_key_claim!r}")
    if args.policy:
        parts.append(f"policy {args.policy}")
    if args.private_only:
        parts.append("private channels only")
    if args.allowed_origins:
        parts.append(f"origins {', '.join(args.allowed_origins)}")
    if args.allow_anonymous:
        parts.append("anonymous allowed")
    return "auth: " + (", ".join(parts) if parts else "none")


async def _freeze_connections(server: PresenceServer) -> None:
    """Keep settled connections out of full garbage collections.

    Each connection is about 22 objects that the collector tracks, so at 20,000 connections a
    full collection walks some 440,000 objects and stops the loop for 0.2 s (measured), which
    every diff then waits for.  A connection holds no reference cycle (checked: a closed one
    is freed by reference counting alone, frozen or not), so once connections have grown by
    a tenth, a young collection clears the cyclic garbage of the moment and `gc.freeze` moves
    what is left out of the collector's walk.  The cost: cyclic garbage that forms later among
    frozen objects stays until the process ends, which a connection does not produce.
    """
    frozen_at = 0
    while True:
        await asyncio.sleep(1.0)
        count = server.connections
        frozen_at = min(frozen_at, count)  # those that left are freed, frozen or not
        if count > frozen_at * 1.1 + 100:
            gc.collect(1)
            gc.freeze()
            frozen_at = count


def components(args: argparse.Namespace) -> tuple[ServerLimits, Tracker, RedisStore | None]:
    """What ``serve``'s options build: the limits, the Tracker and (with --redis or
    --redis-cluster) its store, not started yet.  The ASGI app is built from the same."""
    limits = ServerLimits(
        max_frame_bytes=args.max_frame_bytes,
        max_connections=args.max_connections,
        max_topics_per_connection=args.max_topics,
        joins_per_second=args.joins_per_second,
        broadcasts_per_second=args.broadcasts_per_second,
        max_buffered_bytes=args.max_buffered_bytes,
        max_connections_per_ip=args.max_connections_per_ip,
        messages_per_second=args.messages_per_second,
    )
    plan = Limits(
        rate_per_second=args.presence_rate,
        burst=args.presence_burst,
        max_meta_bytes=args.max_meta_bytes,
        max_topics_per_connection=args.max_topics,
    )
    scalers = []
    if args.scale:
        scalers.append(
            ThresholdScaler(
                args.scale,
                max_replicas=args.scale_max_replicas,
                min_replicas=args.scale_min_replicas,
            )
        )
    tracker = Tracker(
        scalers=scalers,
        connection_ttl=args.connection_ttl,
        node=args.node,
        clock=time.time,  # last-seen times shared through Redis are Unix time
        plans={"default": plan},
        max_connections=max(args.max_connections, 1),
    )
    store = None
    url, cluster = redis_target(args)
    if url:
        from ..store import RedisStore

        store = RedisStore(
            tracker,
            url,
            prefix=args.prefix,
            cluster=cluster,
            liveness_timeout=args.liveness_timeout,
        )
    return limits, tracker, store


async def _serve(
    args: argparse.Namespace, verifier: JwtVerifier | None, policy: Policy | None
) -> int:
    limits, tracker, store = components(args)
    url, _ = redis_target(args)
    if store is not None:
        await store.start()
    server = PresenceServer(
        tracker,
        host=args.host,
        port=args.port,
        limits=limits,
        store=store,
        dashboard=not args.no_dashboard,
        dashboard_token=args.dashboard_token,
        scale_interval=args.scale_interval,
        verifier=verifier,
        key_claim=args.presence_key_claim,
        policy=policy,
        private_only=args.private_only,
        allowed_origins=args.allowed_origins,
        allow_anonymous=args.allow_anonymous,
    )
    await server.start()
    # Everything imported and built so far lives as long as the process: keep it out of every
    # full collection (they would walk some 40,000 objects for nothing).
    gc.collect()
    gc.freeze()
    freezer = asyncio.get_running_loop().create_task(_freeze_connections(server))
    logger.info(
        "presence-core serving %s (node %s, %s; %s)",
        server.url,
        tracker.node,
        f"redis {redact_url(url)}" if url else "in-process",
        _auth_summary(args),
    )
    if args.policy and not (args.jwt_secret or args.jwks):
        logger.warning(
            "--policy without --jwt-secret or --jwks: no client is identified, so the policy "
            "sees empty claims, and public channels are open to anyone who can connect"
        )
    if not auth_on(args):
        logger.warning(
            "nothing is authenticated: any client that can connect to port %d (on %s) may "
            "join any channel and track under any key; pass --jwt-secret or --jwks (and "
            "--presence-key-claim sub) to verify clients",
            server.port,
            args.host,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    if args.drain_seconds > 0:
        logger.info("presence-core draining for %.1f s", args.drain_seconds)
        server.begin_drain()
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.drain_seconds)
    logger.info("presence-core stopping")
    freezer.cancel()
    await server.stop()
    if store is not None:
        await store.stop()
    return 0


def configured(
    argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, JwtVerifier | None, Policy | None]:
    """``serve``'s options from ``argv``, the environment (``PRESENCE_CORE_*``,
    ``REDIS_URL``) and ``--config``, with the verifier and policy they name: what another
    front door (`presence_core.asgi.from_environment`) is configured from.  A bad value exits
    2, as ``serve`` does."""
    args = parse_args(["serve", *argv], environ)
    verifier, policy = _auth_parts(_parsers()[1], args, Redactor.of(args))
    return args, verifier, policy


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
