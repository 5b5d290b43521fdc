"""A server interceptor that maps errors to statuses and records the standard grpc_server_* metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from fibemrss.domain import errors
from fibemrss.platform.capacity import CallLimiter, Deadlines, request_limit
from fibemrss.platform.identity import caller_identity
from fibemrss.platform.revocation import Revocations
from fibemrss.platform.status_mapping import abort_with

log = logging.getLogger(__name__)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Methods whose wrapped handler is kept (a server has a few dozen; unknown names get no handler).
_MAX_CACHED_METHODS = 1024


class ServerMetrics:
    """The metric names and labels of go-grpc-prometheus, so existing dashboards work."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", _LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            _LABELS,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        # No labels, so every server exports it from the start (0): an alert on its increase
        # needs the series to exist before the first refusal.
        self.revoked = Counter(
            "fibemrss_revoked_certificate_uses_total",
            "Calls, MLLP messages, HTTPS requests and signed messages refused because their "
            "certificate is on the federation CA's revocation list (a stolen or withdrawn certificate in use).",
            registry=registry,
        )


def _code_name(context: grpc.ServicerContext) -> str:
    code = context.code()  # type: ignore[attr-defined]  # grpc >= 1.38 has it; grpc-stubs 1.53 lacks it
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _Undecodable:
    """What `_tolerant` hands on for bytes that are no message of the RPC's request type."""


UNDECODABLE = _Undecodable()


@dataclass(frozen=True)
class _TooLarge:
    """What `_tolerant` hands on, undecoded, for a message above its RPC's size limit."""

    size: int
    limit: int


def _tolerant(deserialize: Callable[[bytes], Any] | None, limit: int) -> Callable[[bytes], Any] | None:
    """grpc answers INTERNAL ("Exception deserializing request!") for undecodable bytes; they are
    the caller's fault, so the behaviour gets a marker and answers INVALID_ARGUMENT instead. A
    message above `limit` bytes is not decoded at all (decoding would cost a multiple of its size)."""
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        if len(data) > limit:
            return _TooLarge(len(data), limit)
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - DecodeError, or any error of a deserializer on junk
            return UNDECODABLE

    return tolerant


def _refusal(method: str, request: Any) -> errors.DomainError | None:
    """Why a request marked by `_tolerant` is refused; None for a decoded request."""
    if request is UNDECODABLE:
        return errors.InvalidArgument(
            "the request is not a message of this RPC",
            [errors.FieldProblem("request", f"bytes that do not decode as the {method} request")],
        )
    if isinstance(request, _TooLarge):
        return errors.ResourceExhausted(
            f"request: {request.size} bytes; {method} takes at most {request.limit} bytes per message"
        )
    return None


def _decoded_requests(method: str, streaming: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if streaming:

            def checked(requests: Iterator[Any]) -> Iterator[Any]:
                for request in requests:
                    if (refused := _refusal(method, request)) is not None:
                        raise refused
                    yield request

            return lambda requests, context: behavior(checked(requests), context)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if (refused := _refusal(method, request)) is not None:
                raise refused
            return behavior(request, context)

        return unary

    return decorate


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        metrics: ServerMetrics,
        authorize: Callable[[str, str], None] | None = None,
        limiter: CallLimiter | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self._metrics = metrics
        self._authorize = authorize
        self._limiter = limiter
        self._revocations = revocations
        self._deadlines = Deadlines()
        # grpc asks the interceptor for every call; the wrapped handler of a method is the same
        # each time (as long as the service's own handler is), so it is built once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method  # "/package.Service/Method"
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, full)
        if len(self._wrapped) < _MAX_CACHED_METHODS:
            self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        service, _, method = full.lstrip("/").rpartition("/")
        behavior: Callable[..., Any] | None
        if handler.request_streaming and handler.response_streaming:
            kind, make, wrap = "bidi_stream", grpc.stream_stream_rpc_method_handler, self._wrap_stream
            behavior = handler.stream_stream
        elif handler.request_streaming:
            kind, make, wrap = "client_stream", grpc.stream_unary_rpc_method_handler, self._wrap_unary
            behavior = handler.stream_unary
        elif handler.response_streaming:
            kind, make, wrap = "server_stream", grpc.unary_stream_rpc_method_handler, self._wrap_stream
            behavior = handler.unary_stream
        else:
            kind, make, wrap = "unary", grpc.unary_unary_rpc_method_handler, self._wrap_unary
            behavior = handler.unary_unary
        if behavior is None:
            return handler  # a handler without its behaviour: grpc answers UNIMPLEMENTED itself
        labels = (kind, service, method)
        streams = handler.request_streaming or handler.response_streaming
        guard = self._guarded_stream if handler.response_streaming else self._guarded
        decoded = _decoded_requests(method, handler.request_streaming)
        return make(
            wrap(guard(decoded(behavior), full, streams), labels),
            request_deserializer=_tolerant(handler.request_deserializer, request_limit(method)),
            response_serializer=handler.response_serializer,
        )

    def _admit(self, context: grpc.ServicerContext, method: str) -> Callable[[], None]:
        """Authorizes the caller and takes its capacity slot; returns what releases the slot."""
        identity = caller_identity(context)
        if self._revocations is not None:
            # Per call, not per connection: a connection opened before the revocation is refused
            # at its next call.
            pems = context.auth_context().get("x509_pem_cert")
            pem = pems[0] if pems else None
            refusal = self._revocations.refusal_for_pem(pem, identity) if isinstance(pem, bytes) else None
            if refusal:
                raise errors.Unauthenticated(refusal)
        if self._authorize is not None:
            self._authorize(identity, method)
        if self._limiter is None:
            return lambda: None
        limiter = self._limiter
        limiter.acquire(identity, method)
        return lambda: limiter.release(identity, method)

    def _lifetime(self, context: grpc.ServicerContext, streams: bool) -> int | None:
        """A stream is cancelled at the lifetime limit, which ends a blocked read or watch; a unary
        call at the server's deadline (the client sees CANCELLED; a handler waiting on
        `context.is_active`, as long polls do, returns and frees its worker)."""
        if self._limiter is None:
            return None
        limits = self._limiter.limits
        return self._deadlines.add(
            limits.max_stream_seconds if streams else limits.max_call_seconds, context.cancel
        )

    def _guarded(self, behavior: Callable[..., Any], method: str, streams: bool) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            release = self._admit(context, method)
            timer = self._lifetime(context, streams)
            try:
                return behavior(request, context)
            finally:
                if timer is not None:
                    self._deadlines.discard(timer)
                release()

        return guarded

    def _guarded_stream(self, behavior: Callable[..., Any], method: str, streams: bool) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = self._admit(context, method)
            timer = self._lifetime(context, streams)
            try:
                yield from behavior(request, context)
            finally:
                if timer is not None:
                    self._deadlines.discard(timer)
                release()

        return guarded

    def _fail(self, context: grpc.ServicerContext, exc: Exception, labels: tuple[str, ...]) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]  # as in _code_name
            raise exc  # already aborted by the handler itself
        if not isinstance(exc, errors.DomainError):
            log.error("unhandled error in %s/%s", labels[1], labels[2], exc_info=exc)
        abort_with(context, exc)

    def _series(self, labels: tuple[str, ...]) -> Callable[[grpc.ServicerContext, float], None]:
        """What one call of `labels` records when it ends; the labelled series are looked up once
        per method (and per status code) rather than on every call."""
        seconds = self._metrics.seconds.labels(*labels)
        handled: dict[str, Any] = {}

        def done(context: grpc.ServicerContext, start: float) -> None:
            code = _code_name(context)
            counter = handled.get(code)
            if counter is None:
                counter = handled.setdefault(code, self._metrics.handled.labels(*labels, code))
            counter.inc()
            seconds.observe(time.perf_counter() - start)

        return done

    def _wrap_unary(self, behavior: Callable[..., Any], labels: tuple[str, ...]) -> Callable[..., Any]:
        started, done = self._metrics.started.labels(*labels), self._series(labels)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started.inc()
            start = time.perf_counter()
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - the mapping decides what the client sees
                self._fail(context, exc, labels)
            finally:
                done(context, start)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], labels: tuple[str, ...]) -> Callable[..., Any]:
        started, done = self._metrics.started.labels(*labels), self._series(labels)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started.inc()
            start = time.perf_counter()
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                self._fail(context, exc, labels)
            finally:
                done(context, start)

        return wrapped
