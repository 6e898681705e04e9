"""Bearer-token authentication and roles (one server interceptor), TLS credentials and the bind policy."""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
import grpc

from chronorec.server.service.interceptors import HandlerCache, behavior_of, reject, replace_behavior, run_behavior

log = logging.getLogger("chronorec.security")


class SecurityConfigError(ValueError):
    """The security settings cannot be served as given (the message says what to change)."""


class Role(enum.IntEnum):
    """What a token may do; each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3


_V1 = "chronorec.v1"
# Every RPC the server registers, with the least role that may call it. A method missing here
# needs ADMIN (fail closed), and a test checks that every registered method is listed.
REQUIRED_ROLE: dict[str, Role] = {
    f"/{_V1}.EncoderService/Encode": Role.READ,
    f"/{_V1}.RecommenderService/Recommend": Role.READ,
    f"/{_V1}.RecommenderService/Feedback": Role.WRITE,
    f"/{_V1}.RecommenderService/FeedbackStream": Role.WRITE,
    f"/{_V1}.RecommenderService/SimilarItems": Role.READ,
    f"/{_V1}.RecommenderService/RecommendBatch": Role.READ,
    # Erasure destroys data for good: an operator's call, not an ingest token's.
    f"/{_V1}.RecommenderService/DeleteUser": Role.ADMIN,
    f"/{_V1}.CatalogService/GetItem": Role.READ,
    f"/{_V1}.CatalogService/UpsertItems": Role.WRITE,
    f"/{_V1}.CatalogService/DeleteItems": Role.WRITE,
    f"/{_V1}.ModelService/GetStatus": Role.READ,
    f"/{_V1}.ModelService/ListVersions": Role.READ,
    f"/{_V1}.ModelService/ActivateVersion": Role.ADMIN,
    f"/{_V1}.ModelService/Rollback": Role.ADMIN,
    f"/{_V1}.ModelService/PromoteCanary": Role.ADMIN,
    f"/{_V1}.ModelService/AbortCanary": Role.ADMIN,
    # The schema is public (it ships in the client package), but listing what a server runs is
    # still a caller's business: grpcurl passes a token with -H 'authorization: Bearer ...'.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ,
}
# Load balancers and kubelet gRPC probes cannot send credentials, and health reveals nothing.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

# RFC 6750 b64token: what may follow "Bearer " in an authorization header.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_LENGTH = 16
_LABEL_PATTERN = re.compile(r"[A-Za-z0-9_.:@\-]{1,64}")


def required_role(method: str) -> Role | None:
    """The least role for `method` ("/package.Service/Method"); None for methods open to anyone."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return REQUIRED_ROLE.get(method, Role.ADMIN)


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to: a label safe to log, and its role."""

    label: str
    role: Role


def _digest(token: str | bytes) -> bytes:
    data = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


def token_digest(token: str) -> bytes:
    """The sha256 of a token, as the table keeps it (TokenTable.lookup_digest)."""
    return _digest(token)


def parse_tokens(text: str, source: str, separators: str = "\n") -> list[tuple[bytes, Principal]]:
    """Entries `ROLE TOKEN [LABEL]`, one per line (or per `separators`); '#' starts a comment.

    Returns (sha256 of the token, principal) pairs: only digests are kept in memory, and
    errors name the source and entry number, never the token.
    """
    entries: list[tuple[bytes, Principal]] = []
    pieces = re.split("[" + re.escape(separators) + "]", text)
    for number, raw in enumerate(pieces, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source} entry {number}"
        if len(parts) not in (2, 3):
            raise SecurityConfigError(f"{where}: expected `ROLE TOKEN [LABEL]`")
        role_name, token = parts[0], parts[1]
        try:
            role = Role[role_name.upper()]
        except KeyError:
            raise SecurityConfigError(f"{where}: role {role_name!r} is not one of read, write, admin") from None
        if not _TOKEN_PATTERN.fullmatch(token):
            raise SecurityConfigError(f"{where}: the token has characters outside A-Z a-z 0-9 - . _ ~ + / =")
        if len(token) < MIN_TOKEN_LENGTH:
            raise SecurityConfigError(f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters")
        label = parts[2] if len(parts) == 3 else f"{source}:{number}"
        if len(parts) == 3 and not _LABEL_PATTERN.fullmatch(label):
            raise SecurityConfigError(f"{where}: the label must be 1-64 characters of A-Z a-z 0-9 _ . : @ -")
        entries.append((_digest(token), Principal(label, role)))
    return entries


class TokenTable:
    """The configured tokens; looks a presented token up in constant time.

    A tokens file is re-read when its modification time changes (checked at most every
    `reload_interval_s`), so tokens rotate without a restart; a file that no longer parses
    keeps the previous table and logs why.
    """

    def __init__(self, tokens_file: Path | None = None, inline: str | None = None, *, reload_interval_s: float = 2.0):
        self.tokens_file = Path(tokens_file) if tokens_file is not None else None
        self._inline = parse_tokens(inline, "CHRONOREC_TOKENS", separators=";\n") if inline else []
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._file_entries: list[tuple[bytes, Principal]] = []
        self._file_mtime: int | None = None
        self._checked_at = 0.0
        if self.tokens_file is not None:
            self._file_entries, self._file_mtime = self._read_file()
        self._entries = self._merge()

    def _read_file(self) -> tuple[list[tuple[bytes, Principal]], int]:
        path = self.tokens_file
        assert path is not None
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecurityConfigError(f"tokens file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise SecurityConfigError(
                f"tokens file {str(path)!r} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})"
            ) from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("tokens file %s is readable by group or others; chmod 600 it", path)
        return parse_tokens(text, path.name), info.st_mtime_ns

    def _merge(self) -> list[tuple[bytes, Principal]]:
        entries = self._file_entries + self._inline
        digests = [digest for digest, _ in entries]
        if len(set(digests)) != len(digests):
            raise SecurityConfigError("the same token is configured twice; give each caller its own token")
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """Tokens per role (for the start-up log line)."""
        out = {role.name.lower(): 0 for role in Role}
        for _, principal in self._entries:
            out[principal.role.name.lower()] += 1
        return out

    def _maybe_reload(self) -> None:
        if self.tokens_file is None:
            return
        now = time.monotonic()
        if now - self._checked_at < self.reload_interval_s:
            return
        with self._lock:
            if now - self._checked_at < self.reload_interval_s:
                return
            self._checked_at = now
            try:
                mtime = self.tokens_file.stat().st_mtime_ns
                if mtime == self._file_mtime:
                    return
                previous = self._file_entries
                self._file_entries, self._file_mtime = self._read_file()
                try:
                    self._entries = self._merge()
                except SecurityConfigError:
                    self._file_entries = previous
                    raise
            except (OSError, SecurityConfigError) as exc:
                log.error("tokens file %s not reloaded, keeping the previous tokens: %s", self.tokens_file, exc)
                return
            log.info("tokens file %s reloaded: %s", self.tokens_file, self.counts())

    def lookup(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Every entry is compared, so the time taken does
        not depend on which entry (if any) matches or on how much of a token is right."""
        return self.lookup_digest(_digest(token))

    def lookup_digest(self, presented: bytes) -> Principal | None:
        """The principal of the token whose sha256 is `presented` (token_digest), or None: a
        dashboard session keeps only the digest, and a token rotated out ends its sessions."""
        self._maybe_reload()
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented):
                found = principal
        return found


# Who the call being handled is: set by AuthInterceptor in the call's own task, so it holds for
# that call alone. Work handed to a thread does not carry it: servicers read it first.
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("chronorec_caller", default=None)


def caller_label(context: grpc.aio.ServicerContext | None = None) -> str:
    """The label of the calling token (what audit lines name); without authentication, the peer."""
    principal = _CALLER.get()
    if principal is not None:
        return principal.label
    return f"unauthenticated@{context.peer()}" if context is not None else "unauthenticated"


def _as_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    inner = behavior_of(handler)

    async def authenticated(request, context):
        _CALLER.set(principal)
        return await run_behavior(inner, request, context)

    return replace_behavior(handler, authenticated)


def bearer_token(metadata) -> str | None:
    """The token of the one `authorization: Bearer ...` header, or None (absent, repeated or malformed)."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call against the method's required role.

    No token or an unknown one: UNAUTHENTICATED. A valid token whose role is too low:
    PERMISSION_DENIED. Health checks are open. Token values are never logged. The answer
    comes as soon as the headers arrive: a refused call never waits for its request body, so
    a caller without a token cannot hold a call open.
    """

    def __init__(self, tokens: TokenTable):
        self.tokens = tokens
        # Each principal's wrapped handlers, built once per method: equal principals (a frozen
        # label and role) act the same, and a reloaded tokens file only adds a few.
        self._authenticated: dict[Principal, HandlerCache] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        needed = required_role(method)
        if needed is None:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        principal = self.tokens.lookup(token) if token else None
        if principal is None:
            log.debug("unauthenticated call to %s (%s)", method, "no bearer token" if token is None else "unknown token")
            return reject(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (send the header `authorization: Bearer <token>`)",
            )
        if principal.role < needed:
            log.warning("%s (role %s) may not call %s", principal.label, principal.role.name.lower(), method)
            return reject(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs a {needed.name.lower()} token; this one is {principal.role.name.lower()}",
            )
        cache = self._authenticated.get(principal)
        if cache is None:
            if len(self._authenticated) >= 1024:
                self._authenticated.clear()
            cache = self._authenticated[principal] = HandlerCache(lambda inner: _as_principal(inner, principal))
        return cache.get(handler)


def _read_pem(path: Path | None, what: str, marker: bytes) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    # gRPC reports a bad PEM only as "Failed to bind to address": say which file is wrong.
    if marker not in data:
        raise SecurityConfigError(f"{what} {str(path)!r} is not PEM (no '{marker.decode()}' block)")
    return data


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None when TLS is off); with `client_ca`, clients must
    present a certificate signed by it (mutual TLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    chain = _read_pem(cert, "TLS certificate", b"-----BEGIN CERTIFICATE-----")
    private_key = _read_pem(key, "TLS key", b"PRIVATE KEY-----")
    ca = _read_pem(client_ca, "client CA", b"-----BEGIN CERTIFICATE-----")
    return grpc.ssl_server_credentials(
        [(private_key, chain)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything: treat it as public


def check_dashboard_bind_policy(host: str, tokens: "TokenTable | None") -> None:
    """A web dashboard on an address other machines reach must ask for bearer tokens: it shows and
    swaps models, and a browser cannot sign in with a client certificate alone."""
    if tokens is None and not is_loopback(host):
        raise SecurityConfigError(
            f"refusing to serve the dashboard on {host} without bearer tokens: configure --tokens-file "
            "(or CHRONOREC_TOKENS), or bind it to loopback with --dashboard-host 127.0.0.1"
        )


def check_bind_policy(host: str, authenticated: bool, allow_insecure_public: bool) -> None:
    """Refuse to serve a non-loopback address without authentication unless explicitly allowed."""
    if authenticated:
        return
    if is_loopback(host):
        log.warning(
            "no bearer tokens or client certificates configured: serving UNAUTHENTICATED on loopback %s only", host
        )
        return
    if not allow_insecure_public:
        raise SecurityConfigError(
            f"refusing to serve {host} without authentication: configure --tokens-file (or CHRONOREC_TOKENS) "
            "or mutual TLS (--tls-client-ca), bind 127.0.0.1, or pass --allow-insecure-public"
        )
    log.warning("serving %s WITHOUT AUTHENTICATION (--allow-insecure-public): anyone who can reach it may write and swap models", host)

