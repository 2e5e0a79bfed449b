"""Connect to NATS: one connection with its JetStream context, and the nats→MeshError boundary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker.settings import Settings
from schemas.errors import MeshError, MeshUnavailable, Overloaded

__all__ = ["OUT_OF_STORAGE", "Connection", "pub_ack_error", "translate_error", "unreachable"]

log = logging.getLogger(__name__)

# A process that waits for NATS to come up says so this often.
_WAITING_SAID_EVERY_S = 10.0
# JetStream API error codes that mean "the queue is full" rather than "something broke".
_FULL_CODES = {10077, 10078, 10047, 10026}
# "insufficient resources": the server's storage limit is reached; publishing again will not help soon.
OUT_OF_STORAGE = 10023


def translate_error(exc: BaseException, what: str) -> MeshError:
    """Map a nats-py exception onto the servemesh error tree (the one place that knows both)."""
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        # No responders: no stream, or (in a cluster) none of its replicas leading at the moment.
        return MeshUnavailable(f"{what}: no stream accepts it (is the mesh provisioned?)")
    if isinstance(exc, nats.js.errors.TooManyStalledMsgsError):
        return Overloaded(f"{what}: too many publishes await the stream's acknowledgement")
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _FULL_CODES:
            return Overloaded(f"{what}: queue is full ({exc.description})", err_code=exc.err_code)
        if exc.err_code == OUT_OF_STORAGE:
            return MeshUnavailable(f"{what}: the stream is out of storage ({exc.description})", err_code=exc.err_code)
        return MeshUnavailable(f"{what}: JetStream error {exc.code}/{exc.err_code}: {exc.description}")
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return MeshUnavailable(f"{what}: NATS did not answer in time")
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.NoServersError, OSError)):
        return MeshUnavailable(f"{what}: not connected to NATS ({exc})")
    return MeshUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def unreachable(url: str, cause: BaseException | None) -> MeshUnavailable:
    """The one line a caller gets when no NATS server answers at ``url``."""
    if isinstance(cause, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(cause, OSError) and cause.strerror:
        why = cause.strerror.lower()
    elif cause is not None:
        why = str(cause) or type(cause).__name__
    else:
        why = "no answer"
    return MeshUnavailable(
        f"cannot reach NATS at {url}: {why} (is `servemesh up` running? set --nats or SERVEMESH_NATS_URL)", url=url
    )


def _auth_options(settings: Settings) -> dict[str, Any]:
    """nats-py ``connect`` keywords for the credentials and TLS in ``settings`` (none set: none)."""
    options: dict[str, Any] = {"inbox_prefix": settings.inbox_prefix}
    if settings.user is not None:
        options["user"] = settings.user
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.token is not None:
        options["token"] = settings.token.get_secret_value()
    if settings.nkey_seed is not None or settings.creds_file is not None:
        try:
            import nkeys  # noqa: F401  # nats-py signs the server's nonce with it
        except ImportError:
            raise MeshUnavailable("NKey and .creds authentication need the nkeys package: pip install nkeys") from None
    if settings.creds_file is not None:
        options["user_credentials"] = settings.creds_file
    if settings.nkey_seed is not None:
        seed = settings.nkey_seed.get_secret_value().strip()
        # A user seed is 58 base32 characters starting "SU"; anything else names a seed file.
        if seed.startswith("SU") and len(seed) == 58 and seed.isalnum():
            options["nkeys_seed_str"] = seed
        else:
            options["nkeys_seed"] = seed
    if settings.tls_ca or settings.tls_cert:
        options["tls"] = _tls_context(settings)
    return options


def _refused(exc: Exception) -> bool:
    """The server turned our credentials or certificate down (as opposed to being unreachable)."""
    return isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError)) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the server against ``tls_ca`` (else the system's CAs); presents ``tls_cert`` if set."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:  # ssl.SSLError is one too
        raise MeshUnavailable(f"cannot load the TLS files in settings: {exc}") from exc
    return context


# How nats-server words a refusal: 'permissions violation for publish to "subject"'.
_DENIED_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.IGNORECASE)


def pub_ack_error(msg: Msg, subject: str | None = None) -> MeshError | None:
    """The error in a JetStream publish acknowledgement (of a message published on ``subject``),
    or None when the message was stored."""
    status = msg.headers.get("Status") if msg.headers else None
    if status == "503":
        # No responders: no stream, or (in a cluster) none of its replicas leading at the moment.
        return MeshUnavailable(f"no stream accepts {subject or msg.subject!r} (is the mesh provisioned?)")
    if b'"error"' not in msg.data:
        return None
    try:
        error = json.loads(msg.data)["error"]
    except (ValueError, KeyError, TypeError):
        return MeshUnavailable(f"unreadable acknowledgement: {msg.data[:200]!r}")
    err_code = error.get("err_code")
    description = error.get("description", "")
    if err_code in _FULL_CODES:
        return Overloaded(f"queue is full ({description})", err_code=err_code)
    if err_code == OUT_OF_STORAGE:
        return MeshUnavailable(f"the stream is out of storage ({description}): no request can be queued now",
                               err_code=err_code)  # fmt: skip
    return MeshUnavailable(f"JetStream refused the request: {description}", err_code=err_code)


@dataclass
class Connection:
    """A NATS connection; callbacks registered in ``on_reconnect`` run after every reconnect."""

    nc: NatsClient
    js: JetStreamContext
    settings: Settings
    on_reconnect: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Told (action, subject) when the server refuses a publish or subscription on permissions.
    on_denied: list[Callable[[str, str], None]] = field(default_factory=list)

    async def publish_acked(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> None:
        """A JetStream publish that returns once the stream stored it, or raises (nats-py's errors;
        ``translate_error`` maps them). nats-py's ``publish_async`` shares one reply subscription
        among every publish awaiting its acknowledgement."""
        ack = await self.js.publish_async(subject, payload, wait_stall=timeout, headers=headers)
        await asyncio.wait_for(ack, timeout)

    @classmethod
    async def open(cls, settings: Settings, name: str = "servemesh", wait_s: float | None = -1.0) -> Connection:
        """Connect, trying for ``wait_s`` seconds (default: ``settings.connect_wait_s``; None: until the
        server answers, as long-running processes do) before raising MeshUnavailable. Once connected,
        the connection reconnects by itself for as long as it lives."""
        wait = settings.connect_wait_s if wait_s is not None and wait_s < 0 else wait_s
        holder: list[Connection] = []
        last_error: list[BaseException] = []
        told = [-_WAITING_SAID_EVERY_S]

        async def reconnected() -> None:
            log.info("reconnected to NATS at %s", nc.connected_url)
            for callback in list(holder[0].on_reconnect) if holder else []:
                await callback()

        refused = False

        async def error_cb(exc: Exception) -> None:
            nonlocal refused
            if not holder and _refused(exc):
                # Raising here ends nats-py's first-connect loop, which would otherwise retry
                # forever: no retry fixes wrong credentials or an untrusted certificate.
                refused = True
                raise exc
            if not holder:  # still trying the first time: said when the wait is over (or now and then)
                last_error[:] = [exc]
                if wait is None and time.monotonic() - told[0] >= _WAITING_SAID_EVERY_S:
                    told[0] = time.monotonic()
                    log.warning("waiting for NATS at %s: %s", settings.nats_url, exc)
            elif not refused:  # closing a refused connection reports nothing new
                log.warning("NATS connection error: %s", exc)
            denied = _DENIED_RE.search(str(exc))
            if denied and holder:
                for callback in list(holder[0].on_denied):
                    callback(denied.group(1).lower(), denied.group(2))

        nc = NatsClient()
        try:
            await asyncio.wait_for(
                nc.connect(
                    settings.nats_url,
                    name=name,
                    connect_timeout=settings.connect_timeout_s,  # type: ignore[arg-type]  # seconds, floats work
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    reconnected_cb=reconnected,
                    error_cb=error_cb,
                    pending_size=64 * 1024 * 1024,
                    **_auth_options(settings),
                ),
                wait,
            )
        except TimeoutError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), timeout=1.0)
            raise unreachable(settings.nats_url, last_error[0] if last_error else None) from None
        except Exception as exc:
            if refused:  # free the refused attempt's socket (nats-py's close may hang after a failed handshake)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), timeout=1.0)
            raise translate_error(exc, f"connect to {settings.nats_url}") from exc
        conn = cls(nc=nc, js=nc.jetstream(), settings=settings)
        holder.append(conn)
        return conn

    async def close(self) -> None:
        """Flush what is buffered and close; safe to call twice."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception:  # a dead connection cannot drain; closing is all that is left
            await self.nc.close()
