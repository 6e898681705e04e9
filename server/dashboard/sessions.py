"""Dashboard sign-in: who a browser is (a session made from a bearer token once) and each session's CSRF secret."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from chronorec.server.security import Principal, Role, TokenTable, token_digest

COOKIE_NAME = "chronorec_dashboard"
# A session lasts this long from sign-in, however busy: a stolen cookie stops working.
SESSION_LIFETIME_S = 12 * 3600.0
# Sessions held at once; the oldest goes first (each is ~200 bytes).
MAX_SESSIONS = 10_000
# Without configured tokens (loopback only), the dashboard acts as gRPC does: as an unauthenticated
# caller allowed everything.
UNAUTHENTICATED = Principal("unauthenticated@loopback", Role.ADMIN)


@dataclass(frozen=True)
class Session:
    """A signed-in browser: the digest of the token it signed in with (never the token), and the
    secret its forms carry back (CSRF)."""

    session_id: str
    token_digest: bytes | None  # None without configured tokens
    csrf: str
    created_at: float


class SessionStore:
    """Sessions by cookie value, in memory: a restart signs everyone out, which is the safe side.

    A session's principal is looked up in the token table on every request, so a token removed
    from the tokens file (or given another role) takes effect at once for its sessions too.
    """

    def __init__(self, tokens: TokenTable | None, lifetime_s: float = SESSION_LIFETIME_S,
                 max_sessions: int = MAX_SESSIONS, clock=time.monotonic):
        self.tokens = tokens
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @property
    def authenticated(self) -> bool:
        """True when tokens are configured (every request must then present one)."""
        return self.tokens is not None

    def principal_for_token(self, token: str) -> Principal | None:
        """Who a presented bearer token is (None: unknown), or the unauthenticated caller without tokens."""
        if self.tokens is None:
            return UNAUTHENTICATED
        return self.tokens.lookup(token) if token else None

    def sign_in(self, token: str | None) -> tuple[Session, Principal] | None:
        """A new session for a valid token (any token, or none, without configured tokens)."""
        digest = None
        if self.tokens is not None:
            principal = self.tokens.lookup(token) if token else None
            if principal is None:
                return None
            digest = token_digest(token)
        else:
            principal = UNAUTHENTICATED
        session = Session(secrets.token_urlsafe(32), digest, secrets.token_urlsafe(32), self._clock())
        with self._lock:
            self._sessions[session.session_id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session, principal

    def resolve(self, session_id: str | None) -> tuple[Session, Principal] | None:
        """The live session of a cookie value and who it is now; None when unknown, expired or revoked."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and self._clock() - session.created_at > self.lifetime_s:
                del self._sessions[session_id]
                session = None
        if session is None:
            return None
        if self.tokens is None:
            return session, UNAUTHENTICATED
        principal = self.tokens.lookup_digest(session.token_digest) if session.token_digest else None
        return (session, principal) if principal is not None else None

    def sign_out(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    @staticmethod
    def csrf_matches(session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode("utf-8", "surrogatepass"))

    def __len__(self) -> int:
        return len(self._sessions)
