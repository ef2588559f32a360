"""Embeddings: real MiniLM locally (shape, norms, semantics, base64, tokens, batching), and remote engines."""

from __future__ import annotations

import asyncio
import base64
import re
import sys
import time

import httpx
import numpy as np
import openai
import orjson
import pytest
import yaml
from openai.types import CreateEmbeddingResponse

from devkit.mock_backend import MockBackend
from tests.support import ThreadedServer, free_port, gateway, minilm_path, subprocess_server
from vilms.config.load import build_config
from vilms.serve.embeddings.build import batch_settings
from vilms.serve.embeddings.encoder import SentenceEncoder
from vilms.serve.embeddings.response import embedding_body

pytestmark = pytest.mark.embeddings

SENTENCES = [f"Sentence number {i} talks about {topic}." for i, topic in
             enumerate(["cats", "GPUs", "the weather", "Hanoi street food", "stock markets", "Jetson boards",
                        "football", "rain"] * 8)]


def emb_config(chat_url: str = "http://127.0.0.1:9", **embedding) -> dict:
    return {"serving": {"engine": "openai", "base-url": chat_url, "models": [{"name": "mock", "aliases": ["LLM"]}]},
            "embedding": {"enabled": True, "model": "all-MiniLM-L6-v2", "path": minilm_path(),
                          "aliases": ["Embedding"], **embedding}}


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def gw():
    with gateway(emb_config()) as server:
        yield server


def embed(gw, **body) -> httpx.Response:
    return httpx.post(gw.url + "/v1/embeddings", json=body, timeout=60)


def test_shape_norm_name_and_usage(gw, minilm):
    response = embed(gw, model="Embedding", input=["a cat sits", "GPUs are fast"])
    parsed = CreateEmbeddingResponse.model_validate(response.json())
    assert parsed.model == "Embedding"  # what the caller asked for
    vectors = np.array([d.embedding for d in parsed.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected_tokens = sum(len(ids) for ids in minilm.tokenizer(["a cat sits", "GPUs are fast"])["input_ids"])
    assert parsed.usage.prompt_tokens == expected_tokens


def test_semantic_sanity(gw):
    data = embed(gw, model="all-MiniLM-L6-v2", input=["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
                                                      "Quarterly earnings beat analyst expectations."]).json()["data"]
    a, b, c = (np.array(d["embedding"]) for d in data)
    assert a @ b > a @ c + 0.3


def test_base64_round_trip_matches_float(gw):
    floats = embed(gw, model="Embedding", input="xin chao").json()["data"][0]["embedding"]
    b64 = embed(gw, model="Embedding", input="xin chao", encoding_format="base64").json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), floats, atol=1e-6)


def test_official_client_and_dimensions(gw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x")
    result = client.embeddings.create(model="Embedding", input=["hello"])  # the client asks for base64
    assert len(result.data[0].embedding) == 384
    assert embed(gw, model="Embedding", input="x", dimensions=384).status_code == 200
    response = embed(gw, model="Embedding", input="x", dimensions=128)
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_bad_embedding_requests(gw):
    assert embed(gw, model="nope", input="x").status_code == 404
    assert embed(gw, model="LLM", input="x").status_code == 400
    assert embed(gw, model="Embedding", input=[]).status_code == 400
    assert embed(gw, model="Embedding", input=[""]).json()["error"]["param"] == "input"
    assert embed(gw, model="Embedding", input=[10**6]).status_code == 400  # not a cl100k id (test_api_token_input)


def test_concurrent_callers_are_batched_and_match_direct_encode(gw, minilm):
    async def run() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": "Embedding", "input": s})
                                               for s in SENTENCES))
        return [r.json()["data"][0]["embedding"] for r in responses]

    before = _batch_stats(gw)
    got = np.array(asyncio.run(run()))
    direct = minilm.encode(SENTENCES)
    assert np.allclose(got, direct, atol=1e-4)
    count, total = (a - b for a, b in zip(_batch_stats(gw), before))
    assert total == 64 and count < 32  # 64 callers, far fewer encode() calls


def _batch_stats(gw) -> tuple[float, float]:
    text = httpx.get(gw.url + "/metrics").text
    count = float(re.search(r'vilms:embedding_batch_size_count\{model="all-MiniLM-L6-v2"\} (\S+)', text).group(1))
    total = float(re.search(r'vilms:embedding_batch_size_sum\{model="all-MiniLM-L6-v2"\} (\S+)', text).group(1))
    return count, total


def test_event_loop_keeps_serving_chat_during_a_large_batch():
    mock = MockBackend(tokens=2)
    with ThreadedServer(mock) as backend, gateway(emb_config(backend.url)) as gw:
        big = [f"long sentence {i} " * 20 for i in range(256)]

        async def run() -> tuple[float, list[float]]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
                embed_task = asyncio.create_task(client.post("/v1/embeddings", json={"model": "Embedding", "input": big}))
                await asyncio.sleep(0.05)  # let the encode start
                chat_done = []
                while not embed_task.done() and len(chat_done) < 50:
                    r = await client.post("/v1/chat/completions", json={"model": "LLM", "messages": [{"role": "user", "content": "x"}]})
                    assert r.status_code == 200
                    chat_done.append(time.perf_counter())
                await embed_task
                return time.perf_counter(), chat_done

        embed_end, chats = asyncio.run(run())
        assert len(chats) >= 3 and chats[0] < embed_end  # chat answered while the batch was encoding


def test_embeddings_disabled_is_a_clear_400():
    config = {"serving": {"models": [{"name": "m"}]}, "embedding": {"enabled": False, "model": "all-MiniLM-L6-v2"}}
    with gateway(config) as gw:
        response = embed(gw, model="all-MiniLM-L6-v2", input="x")
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "embeddings_disabled"
    assert error["message"].count("disabled") == 1


def test_remote_engines_ollama_and_openai_compatible(ollama_standin):
    mock = MockBackend()
    with ThreadedServer(mock) as backend:
        config = {"serving": {"engine": "vllm", "ollama-base-url": ollama_standin.url, "models": [
            {"name": "nomic-embed-text", "type": "embedding", "engine": "ollama", "aliases": ["EMB_OLLAMA"]},
            {"name": "e5-remote", "type": "embedding", "engine": "openai", "base-url": backend.url}]}}
        with gateway(config) as gw:
            one = CreateEmbeddingResponse.model_validate(embed(gw, model="EMB_OLLAMA", input=["a", "b c"]).json())
            two = CreateEmbeddingResponse.model_validate(embed(gw, model="e5-remote", input=["a"]).json())
    assert one.model == "EMB_OLLAMA" and len(one.data) == 2 and one.usage.prompt_tokens == 3
    assert [b for k, b in ollama_standin.state["requests"] if k == "embed"][-1]["model"] == "nomic-embed-text"
    assert two.data[0].embedding == pytest.approx([0.6, 0.8]) and mock.last_request["model"] == "e5-remote"


@pytest.mark.llama
def test_llama_cpp_embeddings_through_gateway(llama_url):
    config = {"serving": {"engine": "openai", "base-url": llama_url,
                          "models": [{"name": "tiny-llm", "type": "embedding", "engine": "openai"}]}}
    with gateway(config) as gw:
        parsed = CreateEmbeddingResponse.model_validate(embed(gw, model="tiny-llm", input=["hi", "there"]).json())
    assert len(parsed.data) == 2 and len(parsed.data[0].embedding) == 64


def _tokens(minilm, text: str) -> int:
    """The tokenizer's own count for `text`, truncated as the model truncates it."""
    return len(minilm.tokenizer(text, truncation=True, max_length=minilm.max_seq_length)["input_ids"])


MIXED = ["hi", "A cat is sleeping on the sofa.", "word " * 400, "Xin chào, thế giới!", "GPUs " * 30]


def test_token_counts_equal_the_tokenizers_own_count_per_input(gw, minilm):
    for text in MIXED:  # includes one input longer than max_seq_length (truncated: counted as the model read it)
        usage = embed(gw, model="Embedding", input=[text]).json()["usage"]
        assert usage["prompt_tokens"] == usage["total_tokens"] == _tokens(minilm, text), text[:20]
    assert embed(gw, model="Embedding", input=MIXED).json()["usage"]["prompt_tokens"] == sum(_tokens(minilm, t) for t in MIXED)


def test_encoder_tokenizes_once_and_matches_direct_encode(minilm):
    encoder = SentenceEncoder("m", minilm_path(), chunk=2)  # several length-sorted chunks, scattered back in order
    encoder.load()
    vectors, counts = encoder.encode(MIXED)
    assert vectors.dtype == np.dtype("<f4") and vectors.flags["C_CONTIGUOUS"] and vectors.shape == (5, 384)
    assert np.allclose(vectors, minilm.encode(MIXED), atol=1e-4)
    assert counts.tolist() == [_tokens(minilm, t) for t in MIXED]


def test_a_caller_is_answered_when_its_forward_pass_ends_not_the_batch(minilm):
    """Two callers in one batch, one pass each: the longer text's caller gets its row while the other pass waits."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from vilms.serve.embeddings.batcher import Batcher

    encoder = SentenceEncoder("m", minilm_path(), chunk=1)
    encoder.load()
    second_pass = threading.Event()

    def held_after_the_first_pass(texts):
        passes = encoder.passes(texts)
        yield next(passes)  # the longest text goes first
        second_pass.wait(60)  # the rest runs only once the test has seen the first answer
        yield from passes

    async def scenario():
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher("m", encoder.encode, executor, max_batch=8, max_wait_ms=200,
                          encode_parts=held_after_the_first_pass)
        long_call = asyncio.ensure_future(batcher.submit([MIXED[1]]))
        short_call = asyncio.ensure_future(batcher.submit(["hi"]))
        long_rows, long_tokens = await asyncio.wait_for(long_call, 60)
        early = short_call.done()
        second_pass.set()
        short_rows, short_tokens = await asyncio.wait_for(short_call, 60)
        batcher.close()
        executor.shutdown()
        return early, long_rows, long_tokens, short_rows, short_tokens

    early, long_rows, long_tokens, short_rows, short_tokens = asyncio.run(scenario())
    assert not early
    assert np.allclose(np.vstack([long_rows, short_rows]), minilm.encode([MIXED[1], "hi"]), atol=1e-4)
    assert [*long_tokens, *short_tokens] == [_tokens(minilm, MIXED[1]), _tokens(minilm, "hi")]


def test_passes_that_leave_rows_out_fail_the_waiting_callers_and_empty_callers_are_answered():
    """The batcher's side of the pass contract, with an encoder that stops after one pass of two rows."""
    from concurrent.futures import ThreadPoolExecutor

    from vilms.serve.embeddings.batcher import Batcher
    from vilms.errors import GatewayError

    def one_pass_only(texts):
        index = np.arange(2)
        yield index, np.ones((2, 3), dtype="<f4"), np.array([1, 1])

    async def scenario():
        batcher = Batcher("m", None, ThreadPoolExecutor(max_workers=1), max_batch=64, max_wait_ms=50,
                          encode_parts=one_pass_only)
        calls = [asyncio.ensure_future(batcher.submit(t)) for t in (["a", "b"], [], ["c"])]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        batcher.close()
        return results

    done, empty, starved = asyncio.run(scenario())
    assert done[0].shape == (2, 3) and done[1].tolist() == [1, 1]
    assert empty[0].shape[0] == 0 and empty[1].size == 0
    assert isinstance(starved, GatewayError) and starved.status == 500 and "2 of 3 rows" in starved.message


def test_matryoshka_dimensions_shorten_and_renormalise(minilm):
    with gateway(emb_config(matryoshka=True)) as server:
        full = embed(server, model="Embedding", input=MIXED[:3]).json()["data"]
        short = CreateEmbeddingResponse.model_validate(embed(server, model="Embedding", input=MIXED[:3], dimensions=100).json())
        b64 = embed(server, model="Embedding", input=MIXED[:3], dimensions=100, encoding_format="base64").json()["data"]
        too_big = embed(server, model="Embedding", input="x", dimensions=385)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "dimensions"
    for f, s, b in zip(full, short.data, b64):
        head = np.array(f["embedding"][:100])
        assert len(s.embedding) == 100
        assert np.allclose(s.embedding, head / np.linalg.norm(head), atol=1e-5)
        # 100 floats = 400 bytes, not a multiple of 3: the per-row base64 path
        assert np.allclose(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"), s.embedding, atol=1e-6)


@pytest.mark.parametrize("rows,dims", [(1, 1), (3, 2), (4, 3), (2, 384), (5, 100), (7, 5)])
def test_response_bytes_mean_what_the_plain_python_response_meant(rows, dims):
    vectors = np.random.default_rng(rows * dims).standard_normal((rows, dims)).astype(np.float32)
    for encoding in ("float", "base64"):
        body = orjson.loads(embedding_body('name "quoted"', vectors, 42, encoding))
        if encoding == "base64":  # what the openai client does with a base64 answer before validating it
            for d in body["data"]:
                d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist()
        got = CreateEmbeddingResponse.model_validate(body)
        assert got.model == 'name "quoted"' and got.usage.prompt_tokens == got.usage.total_tokens == 42
        assert [d.index for d in got.data] == list(range(rows)) and {d.object for d in got.data} == {"embedding"}
        for d, row in zip(got.data, vectors):
            assert np.array_equal(np.array(d.embedding, dtype=np.float32), row)  # float32 round-trips exactly


def test_order_of_rows_under_batching_with_mixed_request_sizes(gw, minilm):
    groups = [SENTENCES[i:i + k] for i, k in zip(range(0, 60, 6), [1, 3, 6, 2, 5, 1, 4, 6, 2, 3])]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": "Embedding", "input": g})
                                               for g in groups))
        return [r.json() for r in responses]

    direct = {s: v for s, v in zip(SENTENCES, minilm.encode(SENTENCES))}
    for group, body in zip(groups, asyncio.run(run())):
        assert [d["index"] for d in body["data"]] == list(range(len(group)))
        assert np.allclose([d["embedding"] for d in body["data"]], [direct[s] for s in group], atol=1e-4)
        assert body["usage"]["prompt_tokens"] == sum(_tokens(minilm, s) for s in group)


def test_batch_defaults_follow_the_device_and_explicit_values_win():
    def settings(**emb):
        return batch_settings(build_config({"serving": {"models": []},
                                            "embedding": {"enabled": True, "model": "m", **emb}}).embedding)
    cpu, cuda = settings(), settings(device="cuda:1")
    assert (cpu.max_batch, cpu.max_wait_ms) != (cuda.max_batch, cuda.max_wait_ms)
    assert settings(device="cuda", **{"max-batch-size": 7, "max-wait-ms": 0}).max_batch == 7
    assert settings(device="cuda", **{"max-wait-ms": 0}).max_wait_ms == 0
    assert settings(**{"batch-defaults": {"cpu": {"max-batch-size": 9, "max-wait-ms": 1}}}).max_batch == 9
    # Forward passes: the device's default, an explicit size, never more than a batch, else the batch size
    assert cpu.forward < cpu.max_batch and cuda.forward == cuda.max_batch
    assert settings(**{"forward-batch-size": 8}).forward == 8
    assert settings(**{"max-batch-size": 4}).forward == 4
    assert settings(**{"batch-defaults": {"cpu": {"max-batch-size": 9, "max-wait-ms": 1}}}).forward == 9


def test_two_workers_share_one_encoder_process(tmp_path, minilm):
    """`vilms serve --workers 2`: both workers feed one encoder process; rows, order, tokens, base64 all hold."""
    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({**emb_config(), "gateway": {"workers": 2, "log-level": "warning"}}))
    args = [sys.executable, "-m", "vilms", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    groups = [SENTENCES[i:i + 1 + i % 4] for i in range(0, 64, 2)]

    async def run(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": "Embedding", "input": g})
                                               for g in groups))
        return [r.json() for r in responses]

    with subprocess_server(args, "/health_check", port, timeout=180) as url:
        # the config's chat engine is absent on purpose, so the gateway as a whole stays 503: wait for the encoder
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and ("all-MiniLM-L6-v2", "ready") not in [
                (m["model"], m["state"]) for m in httpx.get(url + "/health/ready", timeout=10).json()["models"]]:
            time.sleep(0.5)
        bodies = asyncio.run(run(url))
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        via_client = client.embeddings.create(model="Embedding", input=MIXED)  # base64 on the wire
        readiness = [[(m["model"], m["state"]) for m in httpx.get(url + "/health/ready").json()["models"]
                      if m["engine"] == "local"] for _ in range(8)]
    direct = {s: v for s, v in zip(SENTENCES, minilm.encode(SENTENCES))}
    for group, body in zip(groups, bodies):
        assert np.allclose([d["embedding"] for d in body["data"]], [direct[s] for s in group], atol=1e-4)
        assert body["usage"]["prompt_tokens"] == sum(_tokens(minilm, s) for s in group)
    assert np.allclose([d.embedding for d in via_client.data], minilm.encode(MIXED), atol=1e-4)
    assert all(b == [("all-MiniLM-L6-v2", "ready")] for b in readiness)  # whichever worker answers



def test_unreachable_shared_encoder_is_a_clear_503_and_not_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("VILMS_ENCODER_SOCKET", str(tmp_path / "missing.sock"))
    with gateway(emb_config()) as server:
        response = embed(server, model="Embedding", input="x")
        ready = httpx.get(server.url + "/health/ready")
    assert response.status_code == 503 and response.json()["error"]["code"] == "embedding_model_unavailable"
    local = [(m["model"], m["state"], m["ready"]) for m in ready.json()["models"] if m["engine"] == "local"]
    assert ready.status_code == 503 and local == [("all-MiniLM-L6-v2", "unreachable", False)]


def test_serve_lets_openmp_threads_sleep_unless_the_operator_chose():
    """`vilms serve` sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads starve the event loop on small
    CPUs, bench/embeddings.py); an operator's own value wins."""
    from vilms.cli import quiet_openmp

    env: dict[str, str] = {}
    quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp(chosen)
    assert chosen == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.parametrize("body", [
    {"model": "m", "input": "hi"}, {"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8},
    {"model": "m", "input": "hi", "user": "u" * 256, "extra": 1}, {"model": "m", "input": "hi", "user": "u" * 257},
    {"model": "", "input": "hi"}, {"model": 5, "input": "hi"}, {"input": "hi"}, {"model": "m"},
    {"model": "m", "input": []}, {"model": "m", "input": [1, 2]}, {"model": "m", "input": [[1], [2]]},
    {"model": "m", "input": ["a", 1]}, {"model": "m", "input": ""}, {"model": "m", "input": "hi", "dimensions": 0},
    {"model": "m", "input": "hi", "dimensions": True}, {"model": "m", "input": "hi", "dimensions": 1.0},
    {"model": "m", "input": "hi", "encoding_format": None}, {"model": "m", "input": "hi", "encoding_format": "int8"},
    {"model": "m", "input": "hi", "dimensions": None, "user": None}])
def test_the_linear_check_accepts_only_what_the_strict_model_accepts_and_reads_the_same_fields(body):
    """The hot path's linear check either passes a request on with exactly the fields the pydantic model would
    give, or hands it to the model (which then words the error); it never lets through what the model refuses."""
    from vilms.errors import BadRequest
    from vilms.serve.api.requests import EmbeddingRequest, validated
    from vilms.serve.embeddings.response import plain_embedding_request

    fast = plain_embedding_request(body)
    try:
        strict = validated(EmbeddingRequest, body)
    except BadRequest:
        assert fast is None
        return
    if fast is not None:
        assert (fast.model, fast.input, fast.encoding_format, fast.dimensions) == (
            strict.model, strict.input, strict.encoding_format, strict.dimensions)
