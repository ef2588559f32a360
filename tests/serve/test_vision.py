"""Vision input: decode-verify, frame sampling, downscaling, both engines, and the SSRF guard table."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from openai.types.chat import ChatCompletion
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tests.support import ThreadedServer, gateway, mock_backend

COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white", "black", "gray"]


def image_bytes(size=(32, 32), color="red", fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


@pytest.fixture(scope="module")
def image_server():
    async def image(request: Request) -> Response:
        return Response(image_bytes(color="green", fmt="JPEG"), media_type="image/jpeg")

    async def redirect(request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def big(request: Request) -> Response:
        return Response(b"\xff" * 300_000, media_type="image/jpeg")

    app = Starlette(routes=[Route("/img.jpg", image), Route("/redirect", redirect), Route("/big", big)])
    with ThreadedServer(app) as server:
        yield server


@pytest.fixture()
def backend():
    with mock_backend(tokens=2) as server:
        yield server


def vlm_config(openai_url: str, ollama_url: str = "http://127.0.0.1:9", **media) -> dict:
    return {
        "serving": {"engine": "vllm", "ollama-base-url": ollama_url, "default-max-frames": 8,
                    "models": [
                        {"name": "vl-openai", "type": "vlm", "engine": "openai", "base-url": openai_url,
                         "aliases": ["VLM"], "params": {"max-frames": 4, "max-image-side": 512}},
                        {"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM_SMALL"], "params": {"max-frames": 3}},
                    ]},
        "media": {"max-bytes": 200_000, **media},
    }


def chat(gw, model: str, parts: list) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": parts}]})


def test_frames_evenly_sampled_in_order_with_text_in_place(backend):
    parts = [{"type": "text", "text": "before"}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image_bytes(color=c))}} for c in COLORS]
    parts += [{"type": "text", "text": "after"}]
    with gateway(vlm_config(backend.url)) as gw:
        assert chat(gw, "VLM", parts).status_code == 200
    sent = backend.backend.last_request["messages"][0]["content"]
    assert [p["type"] for p in sent] == ["text"] + ["image_url"] * 4 + ["text"]
    assert sent[0]["text"] == "before" and sent[-1]["text"] == "after"
    kept = [decode(p["image_url"]["url"]).getpixel((0, 0)) for p in sent[1:-1]]
    expected = [Image.new("RGB", (1, 1), COLORS[i]).getpixel((0, 0)) for i in (0, 3, 6, 9)]
    assert kept == expected  # first and last kept, evenly spaced, original order


def test_large_images_downscaled_small_ones_pass_through_untouched(backend):
    small = image_bytes((100, 60), "blue")
    large = image_bytes((2000, 1000), "red", fmt="PNG")
    with gateway(vlm_config(backend.url)) as gw:
        assert chat(gw, "VLM", [{"type": "image_url", "image_url": data_url(small)},  # bare-string form
                                {"type": "image_url", "image_url": {"url": data_url(large), "detail": "low"}}]).status_code == 200
    sent = backend.backend.last_request["messages"][0]["content"]
    assert base64.b64decode(sent[0]["image_url"]["url"].partition(",")[2]) == small
    resized = decode(sent[1]["image_url"]["url"])
    assert resized.size == (512, 256) and resized.format == "JPEG"
    assert sent[1]["image_url"]["detail"] == "low"
    assert len(sent[1]["image_url"]["url"]) < len(data_url(large))


def test_undecodable_image_is_400_naming_the_part(backend):
    with gateway(vlm_config(backend.url)) as gw:
        fake = data_url(b"this is not a png")
        response = chat(gw, "VLM", [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": fake}}])
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages[0].content[1]"
    assert "not a decodable image" in error["message"]
    assert backend.backend.stats["requests"] == 0


def test_ollama_gets_base64_images_sampled(backend, ollama_standin):
    parts = [{"type": "text", "text": "what"}] + [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(color=c))}} for c in COLORS[:5]]
    with gateway(vlm_config(backend.url, ollama_standin.url)) as gw:
        response = chat(gw, "VLM_SMALL", parts)
    assert response.status_code == 200
    ChatCompletion.model_validate(response.json())
    sent = [b for k, b in ollama_standin.state["requests"] if k == "chat"][-1]["messages"][0]
    assert sent["content"] == "what" and len(sent["images"]) == 3
    colors = [Image.open(io.BytesIO(base64.b64decode(i))).getpixel((0, 0)) for i in sent["images"]]
    assert colors == [Image.new("RGB", (1, 1), COLORS[i]).getpixel((0, 0)) for i in (0, 2, 4)]


@pytest.mark.llama
def test_vision_request_through_llama_cpp_engine(llama_url, image_server):
    config = {"serving": {"engine": "openai", "base-url": llama_url,
                          "models": [{"name": "tiny-llm", "type": "vlm", "engine": "openai", "aliases": ["VLM"]}]},
              "media": {"allow-hosts": ["127.0.0.1"]}}
    with gateway(config) as gw:
        response = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": "VLM", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe"},
                {"type": "image_url", "image_url": {"url": image_server.url + "/img.jpg"}},
                {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}]}]})
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())


def test_allow_listed_host_is_fetched(backend, image_server):
    with gateway(vlm_config(backend.url, **{"allow-hosts": ["127.0.0.1"]})) as gw:
        assert chat(gw, "VLM", [{"type": "image_url", "image_url": {"url": image_server.url + "/img.jpg"}}]).status_code == 200
    sent = backend.backend.last_request["messages"][0]["content"][0]["image_url"]["url"]
    assert decode(sent).getpixel((0, 0))[1] > 100  # the green image, as fetched


def test_remote_fetch_switch_off(backend, image_server):
    with gateway(vlm_config(backend.url, **{"allow-hosts": ["127.0.0.1"], "remote-fetch": False})) as gw:
        response = chat(gw, "VLM", [{"type": "image_url", "image_url": {"url": image_server.url + "/img.jpg"}}])
    assert response.status_code == 400 and "disabled" in response.json()["error"]["message"]


def ssrf_targets(port: int, allowed_base: str) -> list[str]:
    return [
        f"http://localhost:{port}/img.jpg",                 # loopback by name (only 127.0.0.1 is allow-listed)
        "http://10.0.0.1/img.jpg",
        "http://172.16.0.1/img.jpg",
        "http://192.168.1.1/img.jpg",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{port}/img.jpg",
        "http://[fd00::1]/img.jpg",
        f"http://2130706433:{port}/img.jpg",                # 127.0.0.1 as a decimal
        f"http://0x7f000001:{port}/img.jpg",                # 127.0.0.1 in hex
        f"http://[::ffff:127.0.0.1]:{port}/img.jpg",        # IPv4-mapped IPv6
        "http://[::ffff:a9fe:a9fe]/",                      # 169.254.169.254, mapped
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        f"{allowed_base}/redirect?to=http://169.254.169.254/latest/meta-data/",
        f"{allowed_base}/redirect?to=http://localhost:{port}/img.jpg",
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        f"{allowed_base}/big",                              # over media.max-bytes
    ]


def test_ssrf_table_every_case_refused_without_leaking_addresses(backend, image_server):
    with gateway(vlm_config(backend.url, **{"allow-hosts": ["127.0.0.1"]})) as gw:
        for url in ssrf_targets(image_server.port, image_server.url):
            response = chat(gw, "VLM", [{"type": "image_url", "image_url": {"url": url}}])
            assert response.status_code == 400, (url, response.text)
            message = response.json()["error"]["message"]
            assert "127.0.0.1" not in message and "169.254" not in message, message
    assert backend.backend.stats["requests"] == 0
