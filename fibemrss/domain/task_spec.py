"""Federated task specifications shared by every hospital and the aggregator (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fibemrss.domain.dataset_size import Weighting
from fibemrss.domain.errors import NotFound

FeatureSource = Literal["age", "sex", "numeric", "coded", "condition"]
LabelKind = Literal["observation", "condition"]
# A condition feature is one-hot over these: recorded (active) within its window, or not.
CONDITION_CATEGORIES = ("present", "absent")


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
    # Condition features: present when recorded with an onset at most this many days before the
    # patient's latest dated entry (None: at any time).
    within_days: int | None = None


@dataclass(frozen=True)
class LabelSpec:
    system: str
    code: str
    # kind "observation": the label is 1 when the observed value is strictly above this.
    positive_above: float = 0.0
    # kind "condition": 1 when the condition is recorded (within `within_days`), else 0.
    kind: LabelKind = "observation"
    within_days: int | None = None


@dataclass(frozen=True)
class CohortSpec:
    """Who a study may read: patients outside it are never exported for the study."""

    min_age: float | None = None
    max_age: float | None = None
    # Observations (system, code) a patient must have to take part.
    required: tuple[tuple[str, str], ...] = ()


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
class PersonalizationSpec:
    """After the last round, each hospital fine-tunes the global model on its own training rows.

    A `validation_fraction` of the training rows (by a seeded hash of the patient key, never a
    test row) is held back from fine-tuning; the hospital serves the personalized model only when
    its validation log-loss is lower than the global model's on those rows.
    """

    local_epochs: int = 5
    learning_rate: float = 0.01
    validation_fraction: float = 0.25


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
    cohort: CohortSpec = field(default_factory=CohortSpec)
    description: str = ""
    version: int = 1  # the study document's version: part of its identity
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
    # Personalized local models after the last round; None serves the global model only.
    personalization: PersonalizationSpec | None = None
    # Federated histograms of the numeric features (fibemrss.domain.histograms): this many equal
    # bins per feature in round 0, released only in merged bins of at least this many patients.
    histogram_bins: int = 10
    histogram_min_count: int = 10
    # The sites that take part (`federation.sites`): a hospital accepts a round's cohort only of
    # these, and the threshold of secure aggregation is fixed over all of them, so an aggregator
    # cannot lower it by showing a smaller cohort (docs/he-codec.md). Empty: the cohort's size.
    sites: tuple[str, ...] = ()
    # Bounded influence (docs/security.md, "Poisoning"): `max_weight` caps one hospital's weight
    # below the codec's 1,024 (`privacy.max_weight`); an honest hospital clips its update (the
    # change from the global model) to `max_update_norm` (`privacy.max_update_norm`, L2), and every
    # hospital refuses a round whose total weight exceeds contributors x max_weight or whose
    # average moves the global model by more than that norm. None: the codec's bounds only.
    max_weight: int | None = None
    max_update_norm: float | None = None
    # Validation gate (`federation.validation_tolerance`): a hospital serves a new model only when
    # its accuracy on the hospital's validation rows is at most this much below the model it
    # serves now. None: every good round's model is served.
    validation_tolerance: float | None = None

    @property
    def validation_fraction(self) -> float:
        """The share of training rows each hospital validates on (personalization's, else 0.25)."""
        return 0.25 if self.personalization is None else self.personalization.validation_fraction

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise NotFound(f"task {self.name} has no feature {name!r}")
