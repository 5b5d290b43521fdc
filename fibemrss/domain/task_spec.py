"""Federated task specifications shared by every hospital and the aggregator (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from fibemrss.domain.dataset_size import Weighting
from fibemrss.domain.errors import NotFound
from fibemrss.domain.records import LOINC, UCI_HEART

FeatureSource = Literal["age", "sex", "numeric", "coded"]


@dataclass(frozen=True)
class FeatureSpec:
    """One model input, named by code and unit so every hospital extracts the same thing."""

    name: str
    source: FeatureSource
    system: str = ""
    code: str = ""
    unit: str = ""  # UCUM unit the value is expressed in, for numeric features
    # For categorical features (sex, coded): the category codes, in one-hot order.
    categories: tuple[str, ...] = ()
    # A nominal magnitude, so that federated statistics travel as O(1) numbers in fixed point.
    scale: float = 1.0


@dataclass(frozen=True)
class LabelSpec:
    system: str
    code: str
    # The label is 1 when the observed value is strictly above this.
    positive_above: float


@dataclass(frozen=True)
class HyperParameters:
    learning_rate: float = 0.05
    local_epochs: int = 1
    batch_size: int = 4
    # The server strategy every hospital applies to the decrypted average (fibemrss.domain.strategies)
    # and its options, e.g. (("eta", 0.03),) for fedyogi; fedprox takes proximal_mu below.
    strategy: str = "fedavg"
    server_options: tuple[tuple[str, float], ...] = ()
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class DpSpec:
    """Patient-level differential privacy of local training (DP-SGD, fibemrss.domain.privacy_accounting).

    Each step samples every training example independently with probability `sample_rate`
    (Poisson sampling, which the accountant assumes), clips each example's gradient to
    `max_grad_norm`, and adds Gaussian noise of standard deviation noise_multiplier x max_grad_norm
    to their sum. `noise_multiplier` None derives it from (target_epsilon, target_delta) over the
    task's rounds. The spend depends only on these fields and the task's rounds and local epochs,
    never on a hospital's dataset size.
    """

    target_epsilon: float | None = 1.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    sample_rate: float = 0.05


@dataclass(frozen=True)
class TaskSpec:
    name: str
    features: tuple[FeatureSpec, ...]
    label: LabelSpec
    model: str = "logistic_regression"
    hyper: HyperParameters = field(default_factory=HyperParameters)
    rounds: int = 15
    quorum: int = 4
    threshold: float = 0.5
    # Each hospital holds out this fraction of its patients, chosen by a seeded hash of the
    # patient key, so the split is fixed across runs and restarts.
    test_fraction: float = 0.2
    split_seed: str = "heart-disease-v1-split-1"
    # Privacy of the aggregation (docs/he-codec.md): uploads carry pairwise masks that cancel
    # only in the sum of a whole cohort, and no hospital submits to, or decrypts, a sum of fewer
    # than min_contributors hospitals.
    pairwise_masking: bool = True
    min_contributors: int = 3
    # The weight of a hospital's updates (fibemrss.domain.dataset_size): "noised" is its example
    # count plus discrete Laplace noise of this scale, rounded to this quantum, drawn once per
    # federation, so no one computes its patient count; "examples" is the exact count.
    weighting: Weighting = "noised"
    weight_noise_scale: float = 8.0
    weight_quantum: int = 8
    # Patient-level DP-SGD in local training; None trains without it.
    dp: DpSpec | None = None

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise NotFound(f"task {self.name} has no feature {name!r}")


HEART_DISEASE_V1 = TaskSpec(
    name="heart-disease-v1",
    features=(
        FeatureSpec("age", "age", unit="a", scale=50.0),
        FeatureSpec("sex", "sex", categories=("male", "female")),
        FeatureSpec(
            "chest_pain",
            "coded",
            UCI_HEART,
            "cp",
            categories=("typical-angina", "atypical-angina", "non-anginal", "asymptomatic"),
        ),
        FeatureSpec("resting_systolic_bp", "numeric", LOINC, "8480-6", unit="mm[Hg]", scale=100.0),
        FeatureSpec("cholesterol", "numeric", LOINC, "2093-3", unit="mg/dL", scale=200.0),
        FeatureSpec("fasting_glucose_over_120", "coded", UCI_HEART, "fbs", categories=("true", "false")),
        FeatureSpec(
            "resting_ecg",
            "coded",
            UCI_HEART,
            "restecg",
            categories=("normal", "st-t-abnormality", "lv-hypertrophy"),
        ),
        FeatureSpec("max_heart_rate", "numeric", UCI_HEART, "thalach", unit="/min", scale=100.0),
        FeatureSpec("exercise_angina", "coded", UCI_HEART, "exang", categories=("true", "false")),
        FeatureSpec("st_depression", "numeric", UCI_HEART, "oldpeak", unit="mm", scale=1.0),
        FeatureSpec("st_slope", "coded", UCI_HEART, "slope", categories=("upsloping", "flat", "downsloping")),
        FeatureSpec("vessels_colored", "numeric", UCI_HEART, "ca", unit="1", scale=1.0),
        FeatureSpec(
            "thalassemia",
            "coded",
            UCI_HEART,
            "thal",
            categories=("normal", "fixed-defect", "reversible-defect"),
        ),
    ),
    label=LabelSpec(UCI_HEART, "num", positive_above=0.0),
    # FedYogi on the decrypted average: the best encrypted strategy of `fibemrss bench quality`
    # (docs/quality.md), and a stateful one, so the end-to-end tests prove that every hospital
    # replays it to the same global model.
    hyper=HyperParameters(learning_rate=0.03, strategy="fedyogi", server_options=(("eta", 0.03),)),
)

# The same task with patient-level DP-SGD (epsilon 1, delta 1e-3 over its 15 rounds: FLamby's
# delta), used by `fibemrss demo --dp`.
HEART_DISEASE_V1_DP = replace(
    HEART_DISEASE_V1,
    name="heart-disease-v1-dp",
    hyper=replace(HEART_DISEASE_V1.hyper, learning_rate=0.1),
    dp=DpSpec(target_epsilon=1.0, target_delta=1e-3, max_grad_norm=1.0, sample_rate=0.05),
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (HEART_DISEASE_V1, HEART_DISEASE_V1_DP)}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFound(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
