"""The shared encoder process: every caller gets its own rows under load from several workers, and callers or
workers that go away mid-batch do not hold up anyone else's answer."""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml

from tests.support import free_port, minilm_path, subprocess_server
from vilms.errors import GatewayError
from vilms.serve.embeddings.batcher import Batcher
from vilms.serve.embeddings.shared import EncoderClient, EncoderServer

SENTENCES = [f"Request {i} asks about {topic}." for i, topic in
             enumerate(["cats", "GPUs", "the weather", "Hanoi street food", "stock markets", "Jetson boards",
                        "football", "rain", "a very long sentence that runs on and on about nothing much"] * 12)]


def rows_for(texts: list[str]) -> np.ndarray:
    """The stand-in encoder's answer: a row per text that names the text (its length, its first byte, its index
    in a fixed table), so any mix-up between callers or within a caller shows."""
    return np.array([[len(t), ord(t[0]), SENTENCES.index(t) if t in SENTENCES else -1, 1.0] for t in texts], "<f4")


class HeldEncoder:
    """A real Batcher in front of an encode that blocks until released (a forward pass that takes its time)."""

    dimension = 4

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[int] = []
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.batcher = Batcher("held", self._encode, self.executor, max_batch=256, max_wait_ms=1)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        assert self.release.wait(30)
        self.calls.append(len(texts))
        return rows_for(texts), np.array([len(t.split()) for t in texts])


@pytest.fixture()
def encoder_socket(tmp_path):
    """An EncoderServer on a real Unix socket, run by the test's own loop (the test's coroutine starts it)."""
    return str(tmp_path / "encoder.sock")


def test_callers_and_a_worker_that_go_away_mid_batch_do_not_stall_the_others(encoder_socket):
    """Three workers (clients) feed one encoder: one caller is cancelled while its batch encodes, and a whole worker
    closes its connection mid-batch. Every other caller still gets its own rows, and the encoder serves on."""
    held = HeldEncoder()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(EncoderServer({"held": held}).handle, path=encoder_socket)
        workers = [EncoderClient(encoder_socket) for _ in range(3)]
        try:
            for worker in workers:
                await worker.connect()
            assert workers[0].dimensions == {"held": 4}
            groups = [SENTENCES[i:i + 1 + i % 3] for i in range(30)]
            calls = [asyncio.ensure_future(workers[i % 3].embed("held", g)) for i, g in enumerate(groups)]
            await asyncio.sleep(0.05)  # the frames are out and the batch is held in the encoder
            calls[0].cancel()
            await workers[2].aclose()  # a worker goes away with its callers' frames in the batch
            held.release.set()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
            for i, (group, result) in enumerate(zip(groups, results)):
                if i == 0:
                    assert isinstance(result, asyncio.CancelledError)
                elif i % 3 == 2:  # the closed worker's callers: a clear 503, not a hang
                    assert isinstance(result, GatewayError) and result.status == 503
                else:
                    vectors, counts = result
                    assert np.array_equal(vectors, rows_for(group)), i
                    assert counts.tolist() == [len(t.split()) for t in group]
            after = await asyncio.wait_for(workers[1].embed("held", [SENTENCES[5]]), 30)  # the encoder lives on
            assert np.array_equal(after[0], rows_for([SENTENCES[5]]))
            assert len(held.calls) < len(groups) // 4  # batched, not one encode per caller
        finally:
            for worker in workers:
                await worker.aclose()
            server.close()
            await server.wait_closed()
            held.batcher.close()
            held.executor.shutdown(wait=False)

    asyncio.run(scenario())


def test_callers_of_one_loop_turn_share_one_frame_and_get_their_own_rows(encoder_socket):
    """One worker, many callers at once: the encoder sees one batcher job per frame, far fewer than callers, and
    each caller's rows are its own (order within a caller kept)."""
    held = HeldEncoder()
    held.release.set()
    jobs: list[int] = []
    submit = held.batcher.submit

    async def counting_submit(texts):  # observes the frames the server receives (each is one job)
        jobs.append(len(texts))
        return await submit(texts)

    held.batcher.submit = counting_submit  # type: ignore[method-assign]

    async def scenario() -> None:
        server = await asyncio.start_unix_server(EncoderServer({"held": held}).handle, path=encoder_socket)
        worker = EncoderClient(encoder_socket)
        try:
            groups = [SENTENCES[i:i + 1 + i % 4] for i in range(64)]
            await worker.connect()
            results = await asyncio.gather(*(worker.embed("held", g) for g in groups))
            for group, (vectors, _) in zip(groups, results):
                assert np.array_equal(vectors, rows_for(group))
            assert sum(jobs) == sum(map(len, groups)) and len(jobs) < len(groups) // 8
        finally:
            await worker.aclose()
            server.close()
            await server.wait_closed()
            held.batcher.close()
            held.executor.shutdown(wait=False)

    asyncio.run(scenario())


@pytest.mark.embeddings
def test_several_workers_under_concurrent_load_answer_each_caller_as_a_direct_encode(tmp_path):
    """`vilms serve --workers 3` (one shared encoder, real MiniLM): 96 concurrent requests of 1-4 sentences, float,
    base64 and an explicit `dimensions`, spread over the workers; each answer equals a direct encode of its own
    sentences, in its order."""
    from sentence_transformers import SentenceTransformer

    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "serving": {"models": []}, "gateway": {"workers": 3, "log-level": "warning"},
        "embedding": {"enabled": True, "model": "minilm", "path": minilm_path()}}))
    args = [sys.executable, "-m", "vilms", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    groups = [SENTENCES[(7 * i) % 100:(7 * i) % 100 + 1 + i % 4] for i in range(96)]

    def body(i: int) -> dict:
        extra = {"encoding_format": "base64"} if i % 2 else {}
        return {"model": "minilm", "input": groups[i], **extra, **({"dimensions": 384} if i % 3 == 0 else {})}

    async def load(url: str) -> list[list[httpx.Response]]:
        """Two overlapping waves of 96 requests on fresh connections. The kernel wakes every worker for a new
        connection and the first awake takes a whole burst, so the second wave (its own client: new connections)
        opens when the first wave's first answer arrives, while the worker that took the first wave is answering."""
        limits = httpx.Limits(max_connections=96)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as one, \
                httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as two:
            first = [asyncio.ensure_future(one.post("/v1/embeddings", json=body(i))) for i in range(96)]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            second = [asyncio.ensure_future(two.post("/v1/embeddings", json=body(i))) for i in range(96)]
            return [await asyncio.gather(*first), await asyncio.gather(*second)]

    def served_by(responses: list[httpx.Response]) -> set[str]:
        return {r.headers["x-request-id"][:12] for r in responses}  # a process-unique prefix per worker

    with subprocess_server(args, "/health/ready", port, timeout=240) as url:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and httpx.get(url + "/health/ready", timeout=10).status_code != 200:
            time.sleep(0.3)
        waves: list[list[httpx.Response]] = []
        while len(served_by([r for w in waves for r in w])) < 2 and len(waves) < 6:
            waves += asyncio.run(load(url))
    model = SentenceTransformer(minilm_path(), device="cpu")
    direct = dict(zip(SENTENCES, model.encode(SENTENCES)))
    assert len(served_by([r for wave in waves for r in wave])) >= 2, [served_by(wave) for wave in waves]
    for i, response in ((i, r) for wave in waves for i, r in enumerate(wave)):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(groups[i])))
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if i % 2 else np.array(d["embedding"])
                for d in data]
        assert all(len(r) == 384 for r in rows)
        assert np.allclose(rows, [direct[s] for s in groups[i]], atol=1e-4), i
