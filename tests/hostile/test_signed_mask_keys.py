"""A malicious aggregator that substitutes a hospital's round mask key (a man in the middle of the
key stage) is caught: the honest agents refuse the round naming the peer, and never upload.

The aggregator is the real one (coordinator, store on PostgreSQL, servicer) behind mutual TLS with
the aggregator's certificate, except that its `GetMaskKeys` answers agents a and b with c's key
replaced by one the attacker holds: keeping c's signature, stripped of any signature, or signed
under a certificate for `agent@c` from a CA of the attacker's own. The agents are the real
protocol over gRPC with their own certificates (gateway and model store are the protocol tests'
fakes). With the key relayed untouched the same setup completes the federation, so the refusal is
the signature check and nothing else.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import pytest

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.pool import Database
from fibemrss.domain.study import study_hash
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.he.codec import UpdateCodec
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.masking import MaskKeyPair
from fibemrss.platform.authorization import central_policy
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import ServerConfig, TlsFiles
from fibemrss.platform.identity import caller_identity
from fibemrss.platform.server import start_server
from fibemrss.tools.certs import init_pki
from fibemrss.tools.study_review import document_of, propose
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.ciphertexts import CiphertextAdder
from services.aggregator.core.coordinator import Coordinator
from services.aggregator.edges.grpc_servicer import AggregatorServicer
from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator
from services.hospital_agent.core.protocol import Participation
from tests.unit.test_agent_masked_rounds import Secrets
from tests.unit.test_agent_protocol import FakeGateway, FakeModelStore, synthetic_examples
from tests.waiting import wait_until

HOSPITALS = ("a", "b", "c")
TASK = dataclasses.replace(HEART_DISEASE_V1, rounds=1, min_contributors=3)
# A key advertisement the attacker holds the secrets of (two X25519 keys and a commitment).
ATTACKER_KEY = MaskKeyPair(b"\x66" * 32).public_key * 3
Tamper = Callable[[pb.MaskKey, bytes], None]  # the relayed key, the federation id


def keep_c_signature(key: pb.MaskKey, federation_id: bytes) -> None:
    key.public_key = ATTACKER_KEY


def strip_signature(key: pb.MaskKey, federation_id: bytes) -> None:
    key.public_key, key.signature, key.certificate = ATTACKER_KEY, b"", b""


def rogue_ca(signer: MaskKeySigner) -> Tamper:
    def tamper(key: pb.MaskKey, federation_id: bytes) -> None:
        forged = signer.sign(federation_id, "rogue-ca", 0, "c", ATTACKER_KEY)
        key.public_key, key.signature, key.certificate = (
            forged.public_key,
            forged.signature,
            forged.certificate,
        )

    return tamper


class MaliciousAggregator(AggregatorServicer):
    """The real servicer, but a and b are shown `tamper`ed c keys; records who uploads."""

    tamper: dict[str, Tamper | None] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # passed through unchanged
        self.uploaders: list[tuple[str, str]] = []

    def GetMaskKeys(
        self, request: pb.GetMaskKeysRequest, context: grpc.ServicerContext
    ) -> pb.GetMaskKeysResponse:
        response = super().GetMaskKeys(request, context)
        tamper = self.tamper.get(request.task)
        if tamper is not None and caller_identity(context) != "agent@c":
            federation_id = self._store.settings(request.task).federation_id
            for key in response.keys:
                if key.hospital == "c":
                    tamper(key, federation_id)
        return response

    def SubmitUpdate(self, request_iterator, context):  # type: ignore[no-untyped-def]  # as generated
        first = next(request_iterator)
        self.uploaders.append((first.task, caller_identity(context)))

        def replay() -> Iterator[pb.SubmitUpdateRequest]:
            yield first
            yield from request_iterator

        return super().SubmitUpdate(replay(), context)


@dataclasses.dataclass
class Setup:
    pki: Path
    address: str
    servicer: MaliciousAggregator
    hospital_key: bytes

    def tls(self, identity: str) -> TlsFiles:
        return TlsFiles(
            str(self.pki / "ca.crt"), str(self.pki / f"{identity}.crt"), str(self.pki / f"{identity}.key")
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> Iterator[Setup]:
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    root = tmp_path_factory.mktemp("signed-keys")
    init_pki(root / "pki", ["aggregator@central", "operator@central", *(f"agent@{h}" for h in HOSPITALS)])
    init_pki(root / "rogue", ["agent@c"])
    url = ensure_database(postgres_server, "t_signed_mask_keys")
    migrate(url, "aggregator")
    db = Database(url)
    hospital_key, aggregator_key = generate_keys()
    pki = root / "pki"
    served = serve_aggregator("malicious-aggregator", db, aggregator_key, pki, MaliciousAggregator)
    rogue = MaskKeySigner(
        (root / "rogue" / "agent@c.crt").read_bytes(), (root / "rogue" / "agent@c.key").read_bytes()
    )
    MaliciousAggregator.tamper = {
        "keep-c-signature": keep_c_signature,
        "unsigned": strip_signature,
        "rogue-ca": rogue_ca(rogue),
        "honest": None,
    }
    yield Setup(pki, served.address, served.servicer, hospital_key)
    served.stop()
    db.close()


S = TypeVar("S", bound=AggregatorServicer)


@dataclasses.dataclass
class ServedAggregator(Generic[S]):
    """The real coordinator behind a servicer of the test's (an attacker or a lossy relay), served
    over mutual TLS with the central policy, its ticker running."""

    coordinator: Coordinator
    store: AggregatorStore
    servicer: S
    address: str
    _running: Any

    def stop(self) -> None:
        self._running.stop(grace=0)
        self.coordinator.stop()


def serve_aggregator(
    name: str,
    db: Database,
    aggregator_key: bytes,
    pki: Path,
    servicer: Callable[[Coordinator, AggregatorStore], S],
) -> ServedAggregator[S]:
    store = AggregatorStore(db)
    coordinator = Coordinator(
        store,
        CiphertextAdder(load_aggregator_key(aggregator_key)),
        tick_seconds=0.05,
        mask_key_verifier=MaskKeyVerifier((pki / "ca.crt").read_bytes()),
    )
    holder: dict[str, S] = {}

    def register(server, registry):  # type: ignore[no-untyped-def]
        holder["s"] = servicer(coordinator, AggregatorStore(db))
        federation_pb2_grpc.add_AggregatorServiceServicer_to_server(holder["s"], server)
        return [pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name]

    tls = TlsFiles(
        str(pki / "ca.crt"), str(pki / "aggregator@central.crt"), str(pki / "aggregator@central.key")
    )
    running = start_server(
        name, register, ServerConfig("127.0.0.1:0", "127.0.0.1:0", tls, None), authorize=central_policy()
    )
    coordinator.start()
    return ServedAggregator(coordinator, store, holder["s"], running.address, running)


def federate(
    setup: Setup,
    task: str,
    until: Callable[[dict[str, Participation]], bool],
    deadline_seconds: float = 30,
    timeout: float = 60,
) -> dict[str, Participation]:
    """Starts a federation of `task` (proposed, pinned by hash, secure aggregation) and runs the
    three agents over mutual TLS until `until(agents)` holds. Any setup with `address`,
    `tls(identity)` and `hospital_key` serves (tests/integration/test_agent_stage_retry.py too)."""
    spec = dataclasses.replace(TASK, name=task)
    digest = study_hash(spec)
    with open_channel(setup.address, setup.tls("operator@central")) as channel:
        # The federation trains one proposed document, pinned by its hash (docs/studies.md).
        assert propose(channel, document_of(spec)).proposal.study_hash == digest
        federation_pb2_grpc.AggregatorServiceStub(channel).StartFederation(
            pb.StartFederationRequest(
                study_hash=digest,
                task=task,
                rounds=spec.rounds,
                quorum=3,
                grace_seconds=0.5,
                deadline_seconds=deadline_seconds,
                hospitals=list(HOSPITALS),
                pairwise_masking=True,
                min_contributors=3,
            )
        )
    hospital_key = load_hospital_key(setup.hospital_key)
    agents: dict[str, Participation] = {}
    channels, stops, threads = [], [], []
    for i, h in enumerate(HOSPITALS):
        tls = setup.tls(f"agent@{h}")
        channels.append(open_channel(setup.address, tls))
        agents[h] = Participation(
            h,
            spec,
            FakeGateway(synthetic_examples(i + 1)),
            GrpcAggregator(channels[-1], task, h, wait_seconds=2, study_hash=digest),
            UpdateCodec(hospital_key),
            FakeModelStore(),
            retry_delay=lambda _: 0.2,
            secrets=Secrets(h),
            signer=MaskKeySigner(Path(tls.cert).read_bytes(), Path(tls.key).read_bytes()),
            verifier=MaskKeyVerifier(Path(tls.ca).read_bytes()),
        )
        stops.append(threading.Event())
        threads.append(threading.Thread(target=agents[h].run, args=(stops[-1],), daemon=True))
        threads[-1].start()
    try:
        wait_until(lambda: until(agents), timeout, f"the agents of {task} reaching the test's condition")
    finally:
        for stop in stops:
            stop.set()
        for t in threads:
            t.join(timeout=30)
        for c in channels:
            c.close()
    return agents


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ("keep-c-signature", "does not cover this message"),
        ("unsigned", "unsigned"),
        ("rogue-ca", "not issued by the federation CA"),
    ],
)
def test_a_substituted_mask_key_makes_the_honest_agents_refuse_the_round_naming_the_peer(
    setup: Setup, task: str, reason: str
) -> None:
    def both_refused(agents: dict[str, Participation]) -> bool:
        return all(agents[h].progress.error for h in ("a", "b"))

    agents = federate(setup, task, both_refused)
    for h in ("a", "b"):
        error = agents[h].progress.error
        assert "round 0" in error and "advertisement of c" in error and reason in error, (h, error)
        assert agents[h].progress.last_submitted_round == -1
    # Neither honest agent ever opened an upload; c (shown the truth) did.
    assert {who for t, who in setup.servicer.uploaders if t == task} <= {"agent@c"}


def test_the_same_setup_relaying_keys_untouched_completes_the_federation(setup: Setup) -> None:
    agents = federate(setup, "honest", lambda agents: all(p.progress.done for p in agents.values()))
    for h, p in agents.items():
        assert p.progress.done and p.progress.error == "", (h, p.progress.error)
        assert p.progress.last_submitted_round == 1
    assert sorted(who for t, who in setup.servicer.uploaders if t == "honest") == sorted(
        [f"agent@{h}" for h in HOSPITALS] * 2
    )


def test_the_aggregator_itself_refuses_an_unsigned_or_foreign_signed_key_naming_the_field(
    setup: Setup,
) -> None:
    task = "publish-checks"
    with open_channel(setup.address, setup.tls("operator@central")) as channel:
        federation_pb2_grpc.AggregatorServiceStub(channel).StartFederation(
            pb.StartFederationRequest(
                task=task,
                rounds=1,
                quorum=3,
                deadline_seconds=30,
                hospitals=list(HOSPITALS),
                pairwise_masking=True,
                min_contributors=3,
            )
        )
    b_signer = MaskKeySigner(
        Path(setup.tls("agent@b").cert).read_bytes(), Path(setup.tls("agent@b").key).read_bytes()
    )
    with open_channel(setup.address, setup.tls("agent@a")) as channel:
        stub = federation_pb2_grpc.AggregatorServiceStub(channel)
        federation_id = stub.GetRound(pb.GetRoundRequest(task=task)).round.federation_id
        b_signed = b_signer.sign(federation_id, task, 0, "b", ATTACKER_KEY)
        for request, why in (
            (pb.PublishMaskKeyRequest(task=task, round=0, hospital="a", public_key=ATTACKER_KEY), "unsigned"),
            (
                pb.PublishMaskKeyRequest(
                    task=task,
                    round=0,
                    hospital="a",
                    public_key=ATTACKER_KEY,
                    signature=b_signed.signature,
                    certificate=b_signed.certificate,
                ),
                "agent@b",
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.PublishMaskKey(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in refused.value.details() or why in str(refused.value.trailing_metadata()), why
