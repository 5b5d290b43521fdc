"""CDS Hooks 2.0 over REST (Starlette): discovery and the `patient-view` service of the task.

Cards come from `fhir_reference` and the reference from `diagnosis.diagnose_values`, the code
behind gRPC `Diagnose`. Callers are authorized as for `Diagnose`. A request the service cannot
answer with a risk (no prefetch, no model yet) gets a card saying so, and one holding a value
the model cannot use (not finite, implausible, a unit that does not convert: `core/input_limits.py`,
the checks of Diagnose) a card naming each refused request field, with no risk; only a body that is
no CDS Hooks request at all, an unknown service or a refused caller gets an HTTP error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fibemrss.domain.errors import DomainError, FieldProblem, InvalidArgument, NotFound
from fibemrss.platform.http_server import Handler, guarded, json_error
from services.inference.core import fhir_reference as fr
from services.inference.core.diagnosis import CAVEAT, LoadedModel, Reference, diagnose_values
from services.inference.core.model_cache import ModelCache, StudyModels

log = logging.getLogger(__name__)

Authorize = Callable[[str, str], None]
DIAGNOSE_METHOD = "/fibemrss.inference.v1.DiagnosisService/Diagnose"
MAX_BODY_BYTES = 16 * 1024 * 1024


def reference_view(model: LoadedModel, ref: Reference) -> fr.ReferenceView:
    return fr.ReferenceView(
        task=model.task.name,
        model_version=model.version,
        federated_round=model.federated_round,
        model_kind=model.kind,
        base_model_version=model.base_version,
        probability=ref.probability,
        risk_band=ref.risk_band,
        contributions=ref.contributions,
        imputed=ref.imputed,
        caveat=CAVEAT,
        outcome=fr.outcome_of(model.task),
    )


class CdsHooks:
    """One `patient-view` service per study served (`<study>-risk`), listed by discovery."""

    def __init__(self, studies: StudyModels, authorize: Authorize | None) -> None:
        self._studies = studies
        self._authorize = authorize

    def routes(self) -> list[Route]:
        return [
            Route("/cds-services", self._guarded(self._discovery), methods=["GET"]),
            Route("/cds-services/{id}", self._guarded(self._service), methods=["POST"]),
        ]

    def _guarded(self, handle: Handler) -> Handler:
        return guarded(
            self._authorize, DIAGNOSE_METHOD, handle, lambda exc, _request: json_error(exc, "cds hooks")
        )

    async def _discovery(self, request: Request) -> Response:
        return JSONResponse(fr.discovery(self._studies.tasks()))

    async def _service(self, request: Request) -> Response:
        task = fr.service_for(self._studies.tasks(), request.path_params["id"])
        if task is None:
            raise NotFound(f"no CDS service {request.path_params['id'][:60]!r}; see GET /cds-services")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise InvalidArgument("request too large", [FieldProblem("body", f"over {MAX_BODY_BYTES} bytes")])
        try:
            doc: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise InvalidArgument("not JSON", [FieldProblem("body", "must be a CDS Hooks request")]) from None
        if not isinstance(doc, dict):
            raise InvalidArgument("not a request", [FieldProblem("body", "must be a JSON object")])
        if doc.get("hook") != "patient-view":
            raise InvalidArgument("wrong hook", [FieldProblem("hook", "this service answers patient-view")])
        if not isinstance(doc.get("hookInstance"), str):
            raise InvalidArgument("no hookInstance", [FieldProblem("hookInstance", "is required (a UUID)")])
        try:
            cache = self._studies.cache(task.name)
        except NotFound:  # retired between the two reads
            raise NotFound(
                f"no CDS service {request.path_params['id'][:60]!r}; see GET /cds-services"
            ) from None
        return JSONResponse({"cards": [await run_in_threadpool(self._card, cache, doc)]})

    @staticmethod
    def _card(cache: ModelCache, doc: dict[str, Any]) -> dict[str, Any]:
        task = cache.task
        read = fr.read_prefetch(task, doc, cache.inputs)
        if read.refused:
            return fr.refused_card(task, read.refused)
        if read.values is None:
            return fr.missing_card(task, read.missing)
        try:
            model = cache.get(0)
        except DomainError:
            return fr.missing_card(task, ["a published model version: none is loaded yet"])
        ref = diagnose_values(model, [read.values])[0]
        return fr.risk_card(reference_view(model, ref), read)
