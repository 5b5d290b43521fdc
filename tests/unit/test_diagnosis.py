"""Diagnosis references, the fast encoding, KServe tensor checks and the model cache, without I/O."""

from __future__ import annotations

import numpy as np
import pytest

from fibemrss.api.kserve.v2 import grpc_service_pb2 as kserve
from fibemrss.domain.errors import InvalidArgument, NotFound
from fibemrss.domain.feature_encoding import encode, input_dim
from fibemrss.domain.feature_extraction import FeatureValue, extract
from fibemrss.domain.model_params import forward_logits, sigmoid
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.serde.records import record_from_proto
from fibemrss.tools.bench.inference_bench import sample_model_version, sample_patient
from services.inference.core import tensors
from services.inference.core.diagnosis import LoadedModel, diagnose, diagnose_batch, infer, risk_band
from services.inference.core.model_cache import ModelCache
from services.inference.edges.kserve_grpc import infer_request_from_proto

TASK = HEART_DISEASE_V1


def loaded(version: int = 1, seed: int = 0) -> LoadedModel:
    mv = sample_model_version(TASK, version, seed)
    return LoadedModel.from_published(TASK, mv.version, mv.federated_round, mv.model)


def random_rows(n: int, seed: int = 0) -> list[list[FeatureValue]]:
    rng = np.random.default_rng(seed)
    rows: list[list[FeatureValue]] = []
    for _ in range(n):
        row: list[FeatureValue] = []
        for f in TASK.features:
            if rng.random() < 0.2:
                row.append(None)
            elif f.categories:
                row.append(str(rng.choice([*f.categories, "not-a-category"])))
            else:
                row.append(float(rng.normal(f.scale, f.scale / 3)))
        rows.append(row)
    return rows


def test_the_encoding_plan_encodes_exactly_like_feature_encoding() -> None:
    model = loaded()
    rows = random_rows(200)
    np.testing.assert_array_equal(model.plan.encode(rows), encode(TASK, model.stats, rows))


def test_occlusion_rows_equal_re_encoding_with_the_feature_missing() -> None:
    model = loaded()
    rows = random_rows(20, seed=1)
    occluded = model.plan.with_occlusions(model.plan.encode(rows))
    for r, row in enumerate(rows):
        expected = encode(
            TASK,
            model.stats,
            [row] + [[None if j == k else v for j, v in enumerate(row)] for k in range(len(row))],
        )
        np.testing.assert_array_equal(occluded[r], expected)


def test_a_reference_matches_the_forward_pass_and_ranks_contributions() -> None:
    model = loaded()
    record = record_from_proto(sample_patient())
    ref = diagnose(model, record)
    values, _ = extract(TASK, record)
    x = encode(TASK, model.stats, [values])
    assert ref.probability == pytest.approx(float(sigmoid(forward_logits(model.layers, x))[0]))
    assert ref.imputed == ["cholesterol"]
    assert ref.label == ("disease" if ref.probability >= 0.5 else "no disease")
    assert len(ref.contributions) == 5
    magnitudes = [abs(c) for _, c in ref.contributions]
    assert magnitudes == sorted(magnitudes, reverse=True)
    # For logistic regression, occlusion is exact: w . (x - x with the feature missing).
    w = model.layers[0][0][0]
    for name, contribution in ref.contributions:
        k = [f.name for f in TASK.features].index(name)
        missing = encode(TASK, model.stats, [[None if j == k else v for j, v in enumerate(values)]])
        assert contribution == pytest.approx(float(w @ (x[0] - missing[0]).astype(np.float64)))


def test_a_batch_equals_one_call_per_patient() -> None:
    model = loaded()
    records = [record_from_proto(sample_patient())] * 3
    # Equal up to rounding: a batched matrix product may sum in another order.
    for batched, single in zip(
        diagnose_batch(model, records), [diagnose(model, r) for r in records], strict=True
    ):
        assert batched.probability == pytest.approx(single.probability, abs=1e-12)
        assert [n for n, _ in batched.contributions] == [n for n, _ in single.contributions]
        assert [c for _, c in batched.contributions] == pytest.approx([c for _, c in single.contributions])
        assert (batched.label, batched.risk_band, batched.imputed) == (
            single.label,
            single.risk_band,
            single.imputed,
        )


def test_risk_bands() -> None:
    assert [risk_band(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == [
        "low",
        "intermediate",
        "high",
        "very high",
    ] + ["very high"]


def test_infer_returns_float32_columns() -> None:
    model = loaded()
    x = np.random.default_rng(2).normal(size=(4, input_dim(TASK))).astype(np.float32)
    p, logit = infer(model, x)
    assert p.shape == logit.shape == (4, 1) and p.dtype == np.float32
    np.testing.assert_allclose(p[:, 0], sigmoid(forward_logits(model.layers, x)), rtol=1e-6)


# -- KServe tensors --------------------------------------------------------------------------------
def request_for(x: np.ndarray, raw: bool = True) -> kserve.ModelInferRequest:
    request = kserve.ModelInferRequest(model_name=TASK.name)
    tensor = request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def decode_features(request: kserve.ModelInferRequest, input_dim: int) -> np.ndarray:
    """The core's check, on the request as the gRPC edge hands it over."""
    return tensors.decode_features(infer_request_from_proto(request), input_dim)


def requested_outputs(request: kserve.ModelInferRequest) -> list[str]:
    return tensors.requested_outputs(infer_request_from_proto(request).outputs)


def violations(call: object) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        call()  # type: ignore[operator]
    return [v.field for v in err.value.violations]


def test_raw_and_typed_contents_decode_alike() -> None:
    x = np.random.default_rng(3).normal(size=(3, 31)).astype(np.float32)
    np.testing.assert_array_equal(decode_features(request_for(x), 31), x)
    np.testing.assert_array_equal(decode_features(request_for(x, raw=False), 31), x)


def test_tensor_mismatches_name_every_field() -> None:
    request = request_for(np.zeros((2, 31), dtype=np.float32))
    request.inputs[0].name = "INPUT__9"
    request.inputs[0].datatype = "INT64"
    assert violations(lambda: decode_features(request, 31)) == [
        "inputs[0].name",
        "inputs[0].datatype",
    ]
    assert violations(lambda: decode_features(request_for(np.zeros((2, 30), np.float32)), 31)) == [
        "inputs[0].shape"
    ]
    typed = request_for(np.zeros((1, 31), np.float32), raw=False)
    typed.inputs[0].contents.int64_contents.append(1)
    assert violations(lambda: decode_features(typed, 31)) == ["inputs[0].contents.int64_contents"]
    two = request_for(np.zeros((1, 31), np.float32))
    two.inputs.add(name="extra", datatype="FP32", shape=[1, 1])
    assert violations(lambda: decode_features(two, 31)) == ["inputs"]


def test_versions_and_outputs() -> None:
    assert tensors.parse_version("", "v") == 0 and tensors.parse_version("12", "v") == 12
    for bad in ("0", "-1", "v1", "1.0"):
        assert violations(lambda bad=bad: tensors.parse_version(bad, "model_version")) == ["model_version"]
    request = request_for(np.zeros((1, 31), np.float32))
    assert requested_outputs(request) == ["probability", "logit"]
    request.outputs.add(name="logit")
    assert requested_outputs(request) == ["logit"]
    request.outputs.add(name="class")
    assert violations(lambda: requested_outputs(request)) == ["outputs[1].name"]


# -- the model cache ---------------------------------------------------------------------------------
class FakeStore:
    def __init__(self) -> None:
        self.versions: dict[int, ModelVersion] = {}
        self.gets = 0

    def latest_version(self, task: str) -> int | None:
        return max(self.versions) if self.versions else None

    def servable_versions(self, task: str) -> list[int]:
        return sorted(self.versions, reverse=True)

    def get(self, task: str, version: int | None = None) -> ModelVersion:
        self.gets += 1
        if version not in self.versions:
            raise NotFound(f"no version {version}")
        return self.versions[version]


def test_the_cache_swaps_in_new_versions_and_keeps_old_ones_servable() -> None:
    store = FakeStore()
    cache = ModelCache(store, TASK)  # type: ignore[arg-type]
    cache.refresh()
    assert not cache.ready and not cache.has(0)
    with pytest.raises(NotFound):
        cache.get()
    store.versions[1] = sample_model_version(TASK, 1)
    first = cache.get()  # the first request looks itself instead of waiting for the poller
    assert cache.ready and first.version == 1
    store.versions[2] = sample_model_version(TASK, 2, seed=2)
    cache.refresh()
    gets = store.gets
    assert cache.get().version == 2
    assert cache.get(1) is first and store.gets == gets  # the replaced version stays in memory
    assert cache.versions() == [2, 1]
    assert not cache.has(7)
