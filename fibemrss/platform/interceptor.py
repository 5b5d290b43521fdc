"""A server interceptor that maps errors to statuses and records the standard grpc_server_* metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from fibemrss.domain import errors
from fibemrss.platform.identity import caller_identity
from fibemrss.platform.status_mapping import abort_with

log = logging.getLogger(__name__)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")


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


def _code_name(context: grpc.ServicerContext) -> str:
    code = context.code()  # type: ignore[attr-defined]  # grpc >= 1.38 has it; grpc-stubs 1.53 lacks it
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics, authorize: Callable[[str, str], None] | None = None) -> None:
        self._metrics = metrics
        self._authorize = authorize

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method  # "/package.Service/Method"
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
        return make(
            wrap(self._authorized(behavior, full), labels),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authorized(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        if self._authorize is None:
            return behavior
        authorize = self._authorize

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            authorize(caller_identity(context), method)
            return behavior(request, context)

        return checked

    def _fail(self, context: grpc.ServicerContext, exc: Exception, labels: tuple[str, ...]) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]  # as in _code_name
            raise exc  # already aborted by the handler itself
        if not isinstance(exc, errors.DomainError):
            log.error("unhandled error in %s/%s", labels[1], labels[2], exc_info=exc)
        abort_with(context, exc)

    def _done(self, context: grpc.ServicerContext, labels: tuple[str, ...], start: float) -> None:
        self._metrics.handled.labels(*labels, _code_name(context)).inc()
        self._metrics.seconds.labels(*labels).observe(time.perf_counter() - start)

    def _wrap_unary(self, behavior: Callable[..., Any], labels: tuple[str, ...]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            self._metrics.started.labels(*labels).inc()
            start = time.perf_counter()
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - the mapping decides what the client sees
                self._fail(context, exc, labels)
            finally:
                self._done(context, labels, start)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], labels: tuple[str, ...]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._metrics.started.labels(*labels).inc()
            start = time.perf_counter()
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                self._fail(context, exc, labels)
            finally:
                self._done(context, labels, start)

        return wrapped
