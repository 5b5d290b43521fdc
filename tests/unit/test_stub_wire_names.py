"""The generated stubs live under fibemrss/api/ (a Python location), but what goes on the wire is
the protos' own names: every gRPC method path a stub calls or serves is /<proto package>.<Service>/
<Method> from the descriptor, with no trace of the folder the stubs were moved into. Third-party
clients (grpcurl, tritonclient, hospital software) and the role matrix depend on those paths."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

STUBS = [
    ("fibemrss.api.emr.v1.emr_pb2", "fibemrss.api.emr.v1.emr_pb2_grpc", "fibemrss.emr.v1"),
    ("fibemrss.api.federation.v1.federation_pb2", "fibemrss.api.federation.v1.federation_pb2_grpc", "fibemrss.federation.v1"),
    ("fibemrss.api.inference.v1.inference_pb2", "fibemrss.api.inference.v1.inference_pb2_grpc", "fibemrss.inference.v1"),
    ("fibemrss.api.kserve.v2.grpc_service_pb2", "fibemrss.api.kserve.v2.grpc_service_pb2_grpc", "inference"),
]


@pytest.mark.parametrize(("messages", "services", "package"), STUBS)
def test_every_method_path_in_the_stubs_is_the_proto_name_not_the_python_location(
    messages: str, services: str, package: str
) -> None:
    descriptor = importlib.import_module(messages).DESCRIPTOR
    assert descriptor.package == package
    expected = {
        f"/{service.full_name}/{method.name}"
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }
    assert expected, f"{messages} declares no service"
    source = inspect.getsource(importlib.import_module(services))
    in_stub = set(re.findall(r"'(/[\w.]+/\w+)'", source))
    assert in_stub == expected
    assert not any(".api." in path for path in in_stub)
