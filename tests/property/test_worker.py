"""Properties of one running worker under bad input: whatever a client sends, the answer is a
typed error with the right status, the worker keeps serving, and good requests sent at the same
time all succeed with the output of a direct onnxruntime call.

Hypothesis drives a sync test; the worker, the client and a raw NATS connection live on an event
loop in a thread of their own for the whole module, so every example meets the same worker.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker import Connection, NatsServer, Settings
from broker.claims import Claims
from examples.build_models import build_fixed_shape_onnx, build_identity_onnx, build_mlp_onnx
from schemas.envelope import Claim, claim_of, decode_reply, decode_request, encode_claim, encode_request
from schemas.errors import BadInput, DeadlineExceeded, MeshError, UnknownModel
from schemas.subjects import (
    BUCKET_CLAIMS,
    HDR_DEADLINE,
    HDR_MSG_ID,
    HDR_REPLY,
    HDR_REPLY_INBOX,
    HDR_ROUTE,
    STREAM_INFER,
    check_name,
    consumer_name,
    infer_subject,
)
from servemesh import MeshClient
from tests.conftest import serving, unique, wait_for
from tests.property.strategies import any_msgpack, numeric_arrays, object_arrays, request_bodies, tensor_maps
from workers.signature import Signature

T = TypeVar("T")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
D_IN, D_OUT = 8, 4


class Mesh:
    """One worker serving three models, a MeshClient, and a raw connection for hand-made messages."""

    def __init__(self, url: str, repo: Path) -> None:
        self.url, self.repo = url, repo
        self.mlp, self.fixed, self.ident = unique("pmlp"), unique("pfixed"), unique("pident")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="props-mesh", daemon=True)
        self._stack = AsyncExitStack()
        self._ids = itertools.count()
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.rng = np.random.default_rng(0)

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def start(self) -> Mesh:
        """Serve the models built in ``repo``; open the reference sessions of the same files."""
        for name in (self.mlp, self.fixed):
            path = str(self.repo / name / "1" / "model.onnx")
            self._sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.worker = await self._stack.enter_async_context(
            serving(self.url, self.repo, [self.mlp, self.fixed, self.ident])
        )
        self.client = await self._stack.enter_async_context(await MeshClient.connect(self.url))
        self.raw = await Connection.open(Settings.from_url(self.url))
        self._stack.push_async_callback(self.raw.close)
        self.inbox = self.raw.nc.new_inbox()
        await self.raw.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    def close(self) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def signature(self, model: str) -> Signature:
        return self.worker.servers[(model, "1")].signature

    def errors(self, status: int) -> int:
        return sum(server.stats.errors[status] for server in self.worker.servers.values())

    # -- hand-made requests -----------------------------------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        future = self._replies.get(msg.subject.rsplit(".", 1)[-1])
        if future is not None and not future.done():
            future.set_result(msg.data)

    def headers(self, reply: bool = True, deadline_s: float = 30.0) -> tuple[dict[str, str], str]:
        """The headers MeshClient sets (request id, reply subject, deadline) and the reply's token."""
        token = f"raw{next(self._ids)}"
        headers = {HDR_MSG_ID: unique("raw"), HDR_DEADLINE: str(int((time.time() + deadline_s) * 1000))}
        if reply:
            headers[HDR_REPLY] = f"{self.inbox}.{token}"
        return headers, token

    async def send(
        self, model: str, payload: bytes, headers: dict[str, str], token: str | None, timeout: float = 10.0
    ) -> bytes | None:
        """Publish as a client would (acked by the stream); the reply, if one is expected."""
        future = self._replies[token] = asyncio.get_running_loop().create_future() if token else None
        try:
            await self.raw.js.publish(infer_subject(model, "1", "normal"), payload, headers=headers)
            return None if future is None else await asyncio.wait_for(future, timeout)
        finally:
            self._replies.pop(token or "", None)

    # -- good requests and what they must return ----------------------------------------------------

    def expected(self, model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        session = self._sessions[model]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(inputs)), strict=True))

    def good_inputs(self) -> dict[str, np.ndarray[Any, Any]]:
        rows = int(self.rng.integers(1, 4))
        return {"input": self.rng.standard_normal((rows, D_IN)).astype(np.float32)}

    async def good(self) -> None:
        """One good request through the client: its output is what onnxruntime computes directly."""
        inputs = self.good_inputs()
        outputs = await self.client.infer(self.mlp, inputs, timeout=20)
        # Rows batched with other requests may take another kernel path: equal to rounding.
        np.testing.assert_allclose(outputs["output"], self.expected(self.mlp, inputs)["output"], rtol=1e-5, atol=1e-6)

    async def alongside(self, bad: Awaitable[T], company: int = 3) -> T:
        """``bad`` sent among good requests (all must succeed), then one more good request after it."""
        result, *_ = await asyncio.gather(bad, *(self.good() for _ in range(company)))
        await self.good()
        return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mesh(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    repo = tmp_path_factory.mktemp("props")
    mesh = Mesh(nats_server.url, repo)
    build_mlp_onnx(repo, mesh.mlp, d_in=D_IN, hidden=16, d_out=D_OUT, max_batch_size=16, max_delay_ms=2)
    build_fixed_shape_onnx(repo, mesh.fixed)
    build_identity_onnx(repo, mesh.ident, "uint8", max_batch_size=4, max_delay_ms=1)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.close()


def local_verdict(signature: Signature, payload: bytes) -> MeshError | None:
    """What the worker must answer, judged here by the same decode and check: None means outputs."""
    try:
        signature.validate(decode_request(payload))
    except MeshError as err:
        return err
    return None


def check_reply(mesh: Mesh, model: str, payload: bytes, reply: bytes | None) -> None:
    assert reply is not None
    try:
        is_claim = claim_of(payload) is not None
    except BadInput:
        is_claim = True
    if is_claim:  # resolved (and refused) before the payload is decoded
        with pytest.raises(BadInput):
            decode_reply(reply)
        return
    verdict = local_verdict(mesh.signature(model), payload)
    if verdict is None:
        outputs = decode_reply(reply).outputs
        for name, want in mesh.expected(model, decode_request(payload)).items():
            np.testing.assert_allclose(outputs[name], want, rtol=1e-5, atol=1e-6)
        return
    with pytest.raises(MeshError) as got:
        decode_reply(reply)
    assert type(got.value) is type(verdict) and got.value.status == 400
    assert got.value.message == verdict.message
    assert got.value.data.get("stage") == f"{model}:1"


# -- malformed envelopes and tensors -----------------------------------------------------------------


@PROPS
@given(
    st.one_of(
        request_bodies().map(msgpack.packb),
        any_msgpack.map(msgpack.packb),
        st.binary(max_size=64),
        st.dictionaries(st.just("input"), tensor_maps(), min_size=1).map(lambda t: msgpack.packb({"inputs": t})),
    )
)
@example(b"")
@example(msgpack.packb({"v": 2, "inputs": {}}))
@example(msgpack.packb({"inputs": {"input": {"dt": ["float32"], "sh": [1, D_IN], "b": b""}}}))
@example(msgpack.packb({"inputs": {"input": {"dt": "float32", "sh": [0, 2**63], "b": b""}}}))
@example(msgpack.packb({"inputs": {"input": {"dt": "float32", "sh": [1] * 70, "b": b"\0" * 4}}}))
def test_malformed_payloads_get_400_and_the_worker_keeps_serving(mesh: Mesh, payload: bytes) -> None:
    headers, token = mesh.headers()
    reply = mesh.run(mesh.alongside(mesh.send(mesh.mlp, payload, headers, token)))
    check_reply(mesh, mesh.mlp, payload, reply)


@settings(PROPS, max_examples=30)
@given(
    st.lists(
        st.one_of(st.integers(2, 10**6), st.sampled_from([10**6, 2**31, 2**32, 2**40])), min_size=1, max_size=4
    ).filter(lambda dims: np.prod(dims, dtype=object) >= 10**9),
    st.sampled_from(["float32", "float64", "uint8", "bool", "complex128"]),
    st.binary(max_size=64),
)
@example([10**6, 10**6], "float32", b"\0" * 32)  # 10^12 elements claimed, 32 bytes sent
def test_huge_declared_dimensions_are_400_not_memory_errors(mesh: Mesh, dims: list[int], dt: str, data: bytes) -> None:
    payload = msgpack.packb({"inputs": {"input": {"dt": dt, "sh": [1, *dims], "b": data}}})
    headers, token = mesh.headers()
    reply = mesh.run(mesh.alongside(mesh.send(mesh.mlp, payload, headers, token)))
    assert reply is not None
    with pytest.raises(BadInput, match="do not fit"):
        decode_reply(reply)


# -- wrong names, dtypes, shapes and ranks, through the client -----------------------------------------

WRONG_NAMES = st.sampled_from(["input", "x", "y", "inpt", "", "INPUT", "x "])


@st.composite
def near_misses(draw: st.DrawFn, mesh_models: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """A request for the batched MLP or the two-input fixed model, right or with mistakes in it."""
    model = draw(st.sampled_from(mesh_models))
    if model == mesh_models[0]:
        rows = draw(st.integers(0, 20))
        inputs: dict[str, Any] = {"input": np.ones((rows, D_IN), np.float32)}
    else:
        inputs = {"x": np.ones((2, 3), np.float32), "y": np.arange(3, dtype=np.float32)}
    for _ in range(draw(st.integers(0, 2))):
        mistake = draw(st.sampled_from(["drop", "add", "dtype", "rank", "shape", "object"]))
        name = draw(st.sampled_from(sorted(inputs))) if inputs else "input"
        if mistake == "drop" and len(inputs) > 1:
            del inputs[name]
        elif mistake == "add":
            inputs[draw(WRONG_NAMES)] = draw(numeric_arrays())
        elif mistake == "dtype":
            dtype = draw(st.sampled_from(["float16", "float64", "int64", "bool"]))
            inputs[name] = np.zeros(np.shape(inputs[name]), dtype)
        elif mistake == "rank":
            inputs[name] = np.asarray(inputs[name]).reshape((*np.shape(inputs[name]), *(1,) * draw(st.integers(1, 3))))
        elif mistake == "shape":
            inputs[name] = draw(numeric_arrays("float32"))
        elif mistake == "object":
            inputs[name] = draw(object_arrays())
    return model, inputs


@PROPS
@given(st.data())
def test_wrong_inputs_get_400_naming_the_problem(mesh: Mesh, data: st.DataObject) -> None:
    model, inputs = data.draw(near_misses((mesh.mlp, mesh.fixed)))
    payload = encode_request(inputs)
    verdict = local_verdict(mesh.signature(model), payload)

    async def send() -> dict[str, np.ndarray[Any, Any]] | MeshError:
        try:
            return await mesh.client.infer(model, inputs, timeout=20)
        except MeshError as err:
            return err

    result = mesh.run(mesh.alongside(send()))
    if verdict is None:
        assert not isinstance(result, MeshError), result
        for name, want in mesh.expected(model, decode_request(payload)).items():
            np.testing.assert_allclose(result[name], want, rtol=1e-5, atol=1e-6)
    else:
        assert isinstance(result, BadInput) and result.status == 400, result
        assert result.message == verdict.message


# -- invalid model names and versions: refused by the client, before anything is sent -----------------


@PROPS
@given(st.one_of(st.text(max_size=12), st.sampled_from(["a.b", "a b", "*", ">", "a*", "", ".", "x" * 200, "a\r\nb"])),
       st.one_of(st.none(), st.text(max_size=6)))  # fmt: skip
@example("", None)  # found by this property: nats-py's InvalidKeyError escaped from the registry lookup
@example("mesh.infer", None)
@example("ok-name", "1.2")
@example("ok:1 2", None)
def test_invalid_model_names_are_typed_errors_on_the_client(mesh: Mesh, model: str, version: str | None) -> None:
    before = mesh.errors(400)

    async def call() -> MeshError:
        try:
            await mesh.client.infer(model, mesh.good_inputs(), version=version, timeout=5)
        except MeshError as err:
            return err
        raise AssertionError(f"{model!r} (version {version!r}) was served")

    err = mesh.run(mesh.alongside(call()))
    name, _, pinned = model.partition(":")
    try:
        check_name(name, pinned or version)
    except ValueError:
        assert isinstance(err, BadInput) and err.status == 400, err
        assert "invalid" in err.message and err.data["model"] == name
    else:
        assert isinstance(err, UnknownModel) and err.status == 404, err
    assert mesh.errors(400) == before  # nothing reached the worker


# -- missing and garbled headers ---------------------------------------------------------------------

text_values = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=12)


def _is_number(value: str) -> bool:
    stripped = value.strip()
    return stripped.isascii() and stripped.isdigit()


deadlines = st.one_of(
    st.just(("absent", None)),
    st.integers(5, 3600).map(lambda s: ("future", str(int((time.time() + s) * 1000)))),
    st.integers(1, 10**6).map(lambda s: ("past", str(int(time.time() * 1000) - s))),
    text_values.filter(lambda v: not _is_number(v)).map(lambda v: ("garbage", v)),
    st.integers(17, 5000).map(lambda n: ("huge", "9" * n)),
    st.sampled_from(["٣", "①", "-5", "1e12", "0x10"]).map(lambda v: ("garbage", v)),
)
msg_ids = st.one_of(st.just(None), text_values.filter(lambda v: v.strip() != ""))


@PROPS
@given(deadlines, msg_ids, st.booleans())
# Found by this property: the worker's header parsing raised on these, so the request was never
# answered nor acked, and the pull credit it held was never given back.
@example(("garbage", "²"), None, False)
@example(("garbage", "²"), "id", True)
@example(("huge", "9" * 400), None, True)  # int, but too large for a float
@example(("huge", "9" * 4301), None, True)  # beyond Python's int() digit limit
def test_missing_and_garbled_headers_never_stop_the_worker(
    mesh: Mesh, deadline: tuple[str, str | None], msg_id: str | None, with_reply: bool
) -> None:
    kind, value = deadline
    headers, token = mesh.headers(reply=with_reply)
    headers.pop(HDR_DEADLINE)
    headers.pop(HDR_MSG_ID)
    if value is not None:
        headers[HDR_DEADLINE] = value
    if msg_id is not None:
        headers[HDR_MSG_ID] = f"{msg_id}{next(mesh._ids)}"  # unique, or the stream drops it as a duplicate
    inputs = mesh.good_inputs()
    payload = encode_request(inputs)
    reply = mesh.run(mesh.alongside(mesh.send(mesh.mlp, payload, headers, token if with_reply else None)))
    if not with_reply:
        consumer = consumer_name(mesh.mlp, "1", "normal")

        async def settled() -> bool:
            info = await mesh.raw.js.consumer_info(STREAM_INFER, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        mesh.run(wait_for(settled, timeout=10, what="the reply-less request to be taken and acked"))
        return
    assert reply is not None
    try:
        got = decode_reply(reply).outputs["output"]
    except BadInput as err:  # a header that cannot be used is refused, naming it
        assert HDR_DEADLINE in err.message or HDR_MSG_ID in err.message, err
        assert kind in ("garbage", "huge") or (msg_id is not None and HDR_MSG_ID in err.message), err
        return
    except DeadlineExceeded:
        assert kind == "past"
        return
    assert kind in ("absent", "future")  # computed
    np.testing.assert_allclose(got, mesh.expected(mesh.mlp, inputs)["output"], rtol=1e-5, atol=1e-6)


# -- reply subjects a client made up -------------------------------------------------------------------

subjects = st.one_of(
    text_values,
    st.sampled_from(["a b", " ", "*", ">", "a.>", "a..b", ".a", "a.", "_INBOX.x y", "a\tb"]),
)


@PROPS
@given(st.sampled_from([HDR_REPLY, HDR_REPLY_INBOX, HDR_ROUTE]), subjects)
@example(HDR_REPLY, "a b")  # found by this property: the reply raised BadSubjectError, and the
@example(HDR_REPLY_INBOX, "a b")  # fallback answering the batch raised again and ended the serving loop
def test_made_up_subjects_in_headers_do_not_stop_the_worker(mesh: Mesh, header: str, value: str) -> None:
    """A subject the worker will publish to, set to anything: the request is answered if it can be,
    its batch-mates are, and the worker goes on serving."""
    headers, token = mesh.headers()
    headers[header] = value
    inputs = mesh.good_inputs()
    # A made-up Mesh-Reply leaves nothing to answer; the others still have the client's reply subject.
    wait_for_reply = token if header != HDR_REPLY else None
    reply = mesh.run(mesh.alongside(mesh.send(mesh.mlp, encode_request(inputs), headers, wait_for_reply)))
    if header == HDR_REPLY:
        pass
    elif header == HDR_REPLY_INBOX:  # answered alone instead of in a bundle
        got = decode_reply(reply).outputs["output"]
        np.testing.assert_allclose(got, mesh.expected(mesh.mlp, inputs)["output"], rtol=1e-5, atol=1e-6)
    elif header == HDR_ROUTE:  # not a route (400), or no such next stage of this owner's (403)
        with pytest.raises(MeshError) as err:
            decode_reply(reply)
        assert err.value.status in (400, 403)
    assert mesh.worker.conn.nc.is_connected


# -- payloads too large for one message ----------------------------------------------------------------


async def _claimed_bytes(mesh: Mesh) -> int:
    """Bytes the claims bucket holds (deleted objects leave only their small metadata)."""
    return int((await mesh.raw.js.stream_info(f"OBJ_{BUCKET_CLAIMS}")).state.bytes)


def test_20_mib_travel_by_claim_check_and_nothing_is_left_behind(mesh: Mesh) -> None:
    assert mesh.raw.nc.max_payload == 1024 * 1024  # the server's default: 20 MiB is 20 messages' worth
    x = mesh.rng.integers(0, 256, (1, 20 * 2**20), dtype=np.uint8)

    async def run() -> tuple[Any, int]:
        reply = await mesh.client.infer_reply(mesh.ident, {"input": x}, timeout=60)
        return reply, await _claimed_bytes(mesh)

    reply, left = mesh.run(mesh.alongside(run()))
    np.testing.assert_array_equal(reply.outputs["output"], x)
    assert left < 64 * 1024  # the client deleted its request's object and the reply's


def test_requests_sent_without_waiting_still_take_the_claim_check(mesh: Mesh) -> None:
    """Once a model's route is cached a request is prepared at once; one above the claim threshold still
    goes through the object store, and its object is deleted once answered."""
    xs = [mesh.rng.integers(0, 256, (1, 64 * 1024), dtype=np.uint8) for _ in range(3)]

    async def stored() -> int:  # messages ever written to the claims bucket
        return int((await mesh.raw.js.stream_info(f"OBJ_{BUCKET_CLAIMS}")).state.last_seq)

    async def run() -> tuple[list[Any], list[bool], list[int], int]:
        settings = Settings.from_url(mesh.url, claims=True, claim_threshold=4096)
        async with await MeshClient.connect(settings=settings) as client:
            replies, cached, writes = [], [], []
            for x in xs:
                cached.append(client._resolver.cached_route(mesh.ident, None, "normal") is not None)
                before = await stored()
                replies.append(await client.infer(mesh.ident, {"input": x}, timeout=30))
                writes.append(await stored() - before)
        return replies, cached, writes, await _claimed_bytes(mesh)

    replies, cached, writes, left = mesh.run(mesh.alongside(run()))
    assert cached == [False, True, True]
    assert all(n >= 2 for n in writes), writes  # each request went through the bucket (chunks, metadata)
    for x, outputs in zip(xs, replies, strict=True):
        np.testing.assert_array_equal(outputs["output"], x)
    assert left < 64 * 1024


def test_above_max_payload_without_claims_is_refused_client_side(mesh: Mesh) -> None:
    async def refused() -> MeshError:
        async with await MeshClient.connect(settings=Settings.from_url(mesh.url, claims=False)) as client:
            try:
                await client.infer(mesh.ident, {"input": np.zeros((1, 2**20), np.uint8)})
            except MeshError as err:
                return err
        raise AssertionError("a request above max_payload was sent")

    err = mesh.run(mesh.alongside(refused()))
    assert isinstance(err, BadInput) and err.status == 400
    assert err.data["size"] > 2**20
    assert f"the server accepts at most {2**20}" in err.message and "claim check" in err.message


@settings(PROPS, max_examples=20)
@given(st.integers(2**19 - 256, 2**20 + 256), st.booleans())
@example(2**20 - 120, False)  # the request fits, its reply would not: a typed error, not a dead batch
def test_sizes_around_the_limits_get_output_or_a_typed_error(mesh: Mesh, size: int, claims: bool) -> None:
    x = np.full((1, size), 7, np.uint8)

    async def call() -> dict[str, np.ndarray[Any, Any]] | MeshError:
        async with await MeshClient.connect(settings=Settings.from_url(mesh.url, claims=claims)) as client:
            try:
                return await client.infer(mesh.ident, {"input": x}, timeout=20)
            except MeshError as err:
                return err

    result = mesh.run(mesh.alongside(call()))
    if isinstance(result, MeshError):
        assert not claims, result
        assert result.status in (400, 500) and str(2**20) in result.message, result
    else:
        np.testing.assert_array_equal(result["output"], x)


@pytest.mark.parametrize(
    "claim",
    [
        Claim(BUCKET_CLAIMS, "no-such-object", 5),
        Claim("mesh-models", "iris", 5),
        Claim(BUCKET_CLAIMS, "huge", 2**40),
    ],
)
def test_claims_that_cannot_be_resolved_are_400(mesh: Mesh, claim: Claim) -> None:
    headers, token = mesh.headers()
    reply = mesh.run(mesh.alongside(mesh.send(mesh.mlp, encode_claim(claim), headers, token)))
    with pytest.raises(BadInput):
        decode_reply(reply)  # type: ignore[arg-type]


def test_the_worker_reads_a_claimed_request_and_leaves_it_to_its_owner(mesh: Mesh) -> None:
    x = mesh.rng.integers(0, 256, (1, 3 * 2**20), dtype=np.uint8)

    async def run() -> tuple[bytes, bool, float]:
        claims = Claims(mesh.raw)
        request = await claims.wrap(encode_request({"input": x}))
        claim = claim_of(request)
        assert claim is not None and claim.size > 3 * 2**20
        headers, token = mesh.headers()
        reply = await mesh.send(mesh.ident, request, headers, token, timeout=30)
        assert reply is not None
        data = await claims.resolve(reply, take=True)
        store = await mesh.raw.js.object_store(BUCKET_CLAIMS)
        still_there = (await store.get_info(claim.name)).size == claim.size
        await claims.release(request)
        ttl = (await mesh.raw.js.stream_info(f"OBJ_{BUCKET_CLAIMS}")).config.max_age
        return data, still_there, ttl

    data, still_there, ttl = mesh.run(mesh.alongside(run()))
    np.testing.assert_array_equal(decode_reply(data).outputs["output"], x)
    assert still_there  # a redelivery could need it: only its owner deletes it
    assert ttl == Settings().claim_ttl_s  # and whatever nobody deletes expires


def test_fire_and_forget_results_arrive_through_the_claim_check_too(mesh: Mesh) -> None:
    x = mesh.rng.integers(0, 256, (1, 2 * 2**20), dtype=np.uint8)
    subject = unique("props.results")

    async def run() -> Any:
        results = await mesh.client.subscribe_results(subject)
        first = asyncio.ensure_future(anext(results))
        request_id = await mesh.client.publish(mesh.ident, {"input": x}, reply_to=subject)
        result = await asyncio.wait_for(first, 30)
        await results.aclose()
        return request_id, result

    request_id, result = mesh.run(mesh.alongside(run()))
    assert result.request_id == request_id and result.error is None, result.error
    np.testing.assert_array_equal(result.reply.outputs["output"], x)
