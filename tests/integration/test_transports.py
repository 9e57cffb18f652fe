"""The weight-sync transports (object store, torch.distributed broadcast over gloo, files) with
real Ray actors: after a sync both engines sample with the learner's policy; corrupt and
out-of-order deliveries are refused and re-fetched; a worker added later catches up; full
weights travel in buckets. A bit error on the wire, which cannot be caused for real here, is
injected by a test-only rollout worker whose fetch step damages what arrived."""

from __future__ import annotations

import importlib.util
import threading

import pytest
import ray
import torch

from learner.interface import TrainBatch, TrainSample
from learner.learner import Learner
from rollout_workers.interface import GenerationRequest, SamplingSettings
from rollout_workers.worker import RolloutWorker
from tests.conftest import worker_settings
from tests.integration.test_weight_sync import as_samples, job_config, mean_abs_gap
from weight_sync.adapter import AdapterWeights, WeightsIntegrityError
from weight_sync.broadcast import BroadcastMember, GroupSpec
from weight_sync.channel import WeightSyncChannel, WeightSyncError
from weight_sync.endpoints import ReceiverActor, WeightsReceiver, WeightsSender
from weight_sync.files import read_version, version_dir, write_version
from weight_sync.full_weights import FullWeights, plan_buckets
from weight_sync.transports import make_transport

ENGINES = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
TRANSPORTS = ["object_store", "broadcast", "file"]
SAMPLING = SamplingSettings(temperature=0.8, max_new_tokens=12)
REQUESTS = [GenerationRequest(f"p{i}", k, [1, 2 + i, 30 + i]) for i in range(4) for k in range(2)]
BF16_GAP = 0.03  # mean |worker - learner| log-prob per token, bf16 on both sides


# ---------------------------------------------------------------- without Ray


def test_buckets_have_one_dtype_and_a_size_limit():
    specs = [
        ("b", torch.bfloat16, 60),
        ("a", torch.bfloat16, 50),
        ("c", torch.float32, 10),
        ("big", torch.bfloat16, 500),
        ("d", torch.bfloat16, 30),
    ]
    # By dtype, then name; "big" exceeds the limit and travels alone.
    assert plan_buckets(specs, 100) == [["a"], ["b"], ["big"], ["d"], ["c"]]
    assert plan_buckets(specs, 120) == [["a", "b"], ["big"], ["d"], ["c"]]


def test_broadcast_rebuilds_weights_across_buckets_and_reuses_buffers():
    """Three members over gloo in one process (threads): mixed dtypes, several buckets, twice."""
    from torch.distributed import TCPStore

    master = TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    spec = GroupSpec("127.0.0.1", master.port, 3, "gloo", 30, "t")
    members, received = {}, {1: [], 2: []}

    def join(rank):
        members[rank] = BroadcastMember(spec, rank, master if rank == 0 else None)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    sent = [
        FullWeights.create(
            v,
            {
                "w.bf16": torch.randn(64, 33).to(torch.bfloat16) * v,
                "w.fp32": torch.randn(7, 5) * v,
                "z.bf16": torch.randn(300).to(torch.bfloat16),
            },
        )
        for v in (1, 2)
    ]
    for weights in sent:
        threads = [threading.Thread(target=members[0].send, args=(weights, 1024))]
        threads += [
            threading.Thread(target=lambda r=r: received[r].append(members[r].receive())) for r in (1, 2)
        ]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for rank in (1, 2):
            got = received[rank][-1]
            got.verify()  # rebuilt with the sha256 the sender published
            assert got.version == weights.version and isinstance(got, FullWeights)
            assert all(
                torch.equal(got.tensors[n], t) and got.tensors[n].dtype == t.dtype
                for n, t in weights.tensors.items()
            )
    first, second = received[1]
    assert first.tensors["w.bf16"].data_ptr() == second.tensors["w.bf16"].data_ptr()  # same buffers


def test_transports_need_the_learner_except_the_object_store():
    assert make_transport("object_store", None, 2**20, 60, None).name == "object_store"
    for name in ("broadcast", "file"):
        with pytest.raises(ValueError, match="needs the learner"):
            make_transport(name, None, 2**20, 60, None)
    with pytest.raises(ValueError, match="unknown sync.transport"):
        make_transport("carrier-pigeon", object(), 2**20, 60, None)


def test_endpoint_names_do_not_clash_with_the_actors_own():
    """Like vLLM's check of a worker extension's names: a mixin method the actor also defined
    would be silently overridden (or override it)."""
    for mixin, actor in ((WeightsReceiver, RolloutWorker), (WeightsSender, Learner)):
        names = {n for n in vars(mixin) if not n.startswith("__")}
        own = {
            n
            for cls in actor.__mro__
            if cls not in (mixin, object)
            for n in vars(cls)
            if not n.startswith("__")
        }
        assert names and not names & own, (mixin.__name__, sorted(names & own))
        assert all(getattr(actor, n) is getattr(mixin, n) for n in names)
    # What the receiver needs of the worker (ReceiverActor): its methods are the worker's own.
    needed = {n for n, v in vars(ReceiverActor).items() if callable(v) and not n.startswith("_")}
    assert needed == {"load_weights"} and needed <= set(vars(RolloutWorker)) - set(vars(WeightsReceiver))


def test_channel_from_config(tmp_path):
    from weight_sync.config import SyncConfig

    learner = object()  # stands for the learner's actor handle; nothing is called on it here
    channel = WeightSyncChannel.from_config(
        SyncConfig(transport="file", payload="full"), learner, str(tmp_path)
    )
    assert (channel.transport.name, channel.transport.root, channel.payload) == (
        "file",
        str(tmp_path),
        "full",
    )
    channel = WeightSyncChannel.from_config(SyncConfig(transport="broadcast", bucket_mb=8), learner)
    assert channel.transport.bucket_bytes == 8 * 2**20 and channel.max_refetches == 2
    assert WeightSyncChannel().transport.name == "object_store"  # what the driver makes today


def test_version_directory_is_atomic_checked_and_pruned(tmp_path):
    adapter = AdapterWeights.create(
        3, {"base_model.model.x.lora_A.weight": torch.randn(4, 8)}, {"r": 4, "lora_alpha": 8}
    )
    for version in (1, 2, 3):
        adapter.version = version
        write_version(adapter, tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002", "v000003"]  # no staging left
    back = read_version(version_dir(tmp_path, 3))
    back.verify()
    assert back.version == 3 and back.peft_config == adapter.peft_config
    # A real corruption on disk: flip the last byte of the tensor data.
    path = version_dir(tmp_path, 3) / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsIntegrityError):
        read_version(version_dir(tmp_path, 3)).verify()


# ---------------------------------------------------------------- with Ray actors


class CorruptingWorker(RolloutWorker):
    """Test-only fault injection: a rollout worker whose next `count` fetches (any transport) get
    a byte of one tensor flipped after the transfer, as a bit error on the wire would. Until told,
    it is a plain RolloutWorker."""

    corrupt_fetches = 0

    def corrupt_next_fetches(self, count: int) -> None:
        self.corrupt_fetches = count

    def _fetch_weights(self, source):
        weights = super()._fetch_weights(source)
        if self.corrupt_fetches > 0:
            self.corrupt_fetches -= 1
            name = sorted(weights.tensors)[0]
            damaged = weights.tensors[name].clone()
            damaged.view(-1).view(torch.uint8)[0] ^= 0xFF
            weights.tensors[name] = damaged
        return weights


class DeliversOtherVersion:
    """Fault injection: a transport that delivers another (older) version than the one
    published, as a reordering transport would."""

    def __init__(self, inner, delivered_ref):
        self.inner, self.delivered_ref = inner, delivered_ref
        self.name = inner.name

    def deliver(self, weights_ref, version, workers):
        return self.inner.deliver(self.delivered_ref, version, workers)

    def reset(self):
        self.inner.reset()


@pytest.fixture(scope="module")
def learner(local_ray, tiny_model_dir):
    actor = ray.remote(Learner).remote(str(tiny_model_dir), **job_config(tiny_model_dir).learner_kwargs())
    yield actor
    ray.kill(actor)


def start_workers(tiny_model_dir, prefix: str, engines=ENGINES, worker_class=RolloutWorker) -> list:
    return [
        ray.remote(worker_class).remote(
            f"{prefix}-{engine}", *worker_settings(job_config(tiny_model_dir, engine), tiny_model_dir)
        )
        for engine in engines
    ]


@pytest.fixture(scope="module")
def workers(local_ray, tiny_model_dir):
    handles = start_workers(tiny_model_dir, "w", worker_class=CorruptingWorker)
    yield handles
    for handle in handles:
        ray.kill(handle)


def train_step(learner) -> int:
    """One real optimizer step that moves the adapter; returns the new policy version."""
    samples = [
        TrainSample(f"s{i}", [1, 2 + i, 30 + i], [40 + i, 50 + i, 60 + i], [-1.0] * 3, (-1.0) ** i, 0)
        for i in range(8)
    ]
    stats = ray.get(learner.train_step.remote(TrainBatch(0, samples, SAMPLING.temperature)))
    assert not stats.skipped
    return stats.policy_version


def channel_for(
    transport: str, learner, payload: str = "lora", bucket_bytes: int = 2**20
) -> WeightSyncChannel:
    return WeightSyncChannel(
        make_transport(transport, learner, bucket_bytes, timeout_s=120, file_root=None),
        learner,
        payload=payload,
    )


def served_sha256(worker) -> str:
    _, sha256 = ray.get(worker.served_weights.remote())
    return sha256


def assert_serves_learner_policy(learner, workers, weights_ref):
    published = ray.get(weights_ref).sha256
    for worker in workers:
        assert served_sha256(worker) == published
        rollouts = ray.get(worker.generate.remote(REQUESTS, SAMPLING))
        learner_logprobs = ray.get(
            learner.score.remote(as_samples(rollouts, [0] * len(rollouts)), SAMPLING.temperature)
        )
        assert mean_abs_gap(rollouts, learner_logprobs) < BF16_GAP


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_gives_every_engine_the_learners_policy(learner, workers, transport):
    channel = channel_for(transport, learner)
    version = train_step(learner)
    ref = channel.export()
    result = channel.publish(version, ref, workers)
    assert result.transport == transport and not result.refetches
    assert set(result.worker_seconds) == set(result.pause_seconds) == {f"w-{e}" for e in ENGINES}
    assert all(
        0 < result.pause_seconds[w] <= result.worker_seconds[w] <= result.seconds
        for w in result.pause_seconds
    )
    assert ray.get([w.policy_version.remote() for w in workers]) == [version] * len(workers)
    assert_serves_learner_policy(learner, workers, ref)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupt_delivery_is_refused_then_refetched(learner, workers, transport):
    channel = channel_for(transport, learner)
    ray.get([w.corrupt_next_fetches.remote(1) for w in workers])  # the first delivery only
    version = train_step(learner)
    ref = channel.export()
    result = channel.publish(version, ref, workers)
    assert {w: len(reasons) for w, reasons in result.refetches.items()} == {f"w-{e}": 1 for e in ENGINES}
    assert all("WeightsIntegrityError" in reasons[0] for reasons in result.refetches.values())
    assert_serves_learner_policy(learner, workers, ref)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_out_of_order_delivery_is_refused_then_refetched(learner, workers, transport):
    channel = channel_for(transport, learner)
    older = channel.export()
    old_version = ray.get(older).version
    channel.publish(train_step(learner), channel.export(), workers)  # workers now ahead of `older`
    channel.transport = DeliversOtherVersion(channel.transport, older)
    version = train_step(learner)
    ref = channel.export()
    result = channel.publish(version, ref, workers)
    assert old_version < version - 1
    assert all("StaleWeightsError" in reasons[0] for reasons in result.refetches.values())
    assert len(result.refetches) == len(workers)
    assert ray.get([w.policy_version.remote() for w in workers]) == [version] * len(workers)
    assert served_sha256(workers[0]) == ray.get(ref).sha256


@pytest.mark.slow
def test_weights_corrupt_at_the_source_fail_with_a_clear_error(learner, workers):
    channel = channel_for("object_store", learner)
    before = ray.get([w.policy_version.remote() for w in workers])
    adapter = ray.get(channel.export())
    adapter.version = max(before) + 1
    name = sorted(adapter.tensors)[0]
    adapter.tensors[name] = adapter.tensors[name] + 1  # changed after the checksum was taken
    with pytest.raises(WeightSyncError, match=r"after 3 deliveries.*WeightsIntegrityError"):
        channel.publish(adapter.version, ray.put(adapter), workers)
    assert ray.get([w.policy_version.remote() for w in workers]) == before  # still serving the old weights


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_added_after_three_versions_catches_up(learner, workers, tiny_model_dir, transport):
    channel = channel_for(transport, learner)
    for _ in range(3):
        channel.publish(train_step(learner), channel.export(), workers)
    (late,) = start_workers(tiny_model_dir, "late", ["hf"])
    try:
        caught_up = ray.get(channel.catch_up(late))  # from the object store
        assert caught_up.served_version == channel.version and caught_up.refused is None
        version = train_step(learner)
        ref = channel.export()
        formations = getattr(channel.transport, "formations", None)
        result = channel.publish(version, ref, [*workers, late])
        if transport == "broadcast":  # formed once for the first workers, re-formed once with the late one
            assert (formations, channel.transport.formations) == (1, 2)
        assert (
            set(result.worker_seconds) == {f"w-{e}" for e in ENGINES} | {"late-hf"} and not result.refetches
        )
        assert_serves_learner_policy(learner, [late], ref)
    finally:
        ray.kill(late)


@pytest.mark.slow
def test_full_weights_in_buckets_over_every_transport(learner, tiny_model_dir):
    """Full weights (the adapter merged in) in 256 KB buckets: each engine reloads all its weights
    and samples with the learner's policy."""
    full_workers = start_workers(tiny_model_dir, "full")
    try:
        for transport in TRANSPORTS:
            channel = channel_for(transport, learner, payload="full", bucket_bytes=2**18)
            version = train_step(learner)
            ref = channel.export()
            weights = ray.get(ref)
            assert isinstance(weights, FullWeights) and weights.version == version
            assert len(plan_buckets([(n, t.dtype, t.nbytes) for n, t in weights.tensors.items()], 2**18)) > 2
            channel.publish(version, ref, full_workers)
            assert_serves_learner_policy(learner, full_workers, ref)
    finally:
        for worker in full_workers:
            ray.kill(worker)
