"""POST /v1/responses through both engines, checked with the official openai client and its own types.

Ollama (stand-in): translated to /api/chat and back. The real llama.cpp engine (an OpenAI-compatible server with
no /v1/responses): served through its chat route. An engine with its own /v1/responses (recording stand-in):
forwarded, model renamed, defaults filled.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from PIL import Image
from pydantic import TypeAdapter

from tests.support import ThreadedServer, gateway

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "add", "description": "add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}


def png_data_url(size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ollama_config(url: str) -> dict:
    return {"host": {"platform": "dgpu"},
            "serving": {"engine": "ollama", "base-url": url,
                        "models": [{"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM"],
                                    "params": {"max-tokens": 4, "temperature": 0.2}}]},
            "embedding": {"enabled": False}}


@pytest.fixture()
def gw(ollama_standin):
    with gateway(ollama_config(ollama_standin.url)) as server:
        yield server


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def last_chat(standin) -> dict:
    return [body for kind, body in standin.state["requests"] if kind == "chat"][-1]


def raw_events(gw, **body) -> list[dict]:
    with httpx.stream("POST", gw.url + "/v1/responses", json={"stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines]
    for event in events:
        EVENTS.validate_python(event)  # every event is one of the client's own types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# -- Ollama ----------------------------------------------------------------------------------------------------


def test_create_text_on_ollama_maps_like_chat(gw, ollama_standin):
    response = client(gw).responses.create(model="VLM", input="hello", instructions="be brief", temperature=0.7,
                                           max_output_tokens=3)
    Response.model_validate(response.model_dump())
    sent = last_chat(ollama_standin)
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert sent["options"]["num_predict"] == 3 and sent["options"]["temperature"] == 0.7
    assert len(response.output_text.split()) == 3
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.model == "qwen2.5vl:3b"


def test_model_defaults_apply_and_store_false_is_echoed(gw, ollama_standin):
    raw = httpx.post(gw.url + "/v1/responses", json={"model": "VLM", "input": "hi", "store": False}).json()
    response = Response.model_validate(raw)
    assert response.store is False and response.object == "response"
    sent = last_chat(ollama_standin)
    assert sent["options"]["num_predict"] == 4 and sent["options"]["temperature"] == 0.2


def test_image_input_reaches_ollama_as_checked_base64(gw, ollama_standin):
    client(gw).responses.create(model="VLM", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what colour?"},
        {"type": "input_image", "image_url": png_data_url(), "detail": "auto"}]}])
    message = last_chat(ollama_standin)["messages"][0]
    assert message["content"] == "what colour?"
    image = Image.open(io.BytesIO(base64.b64decode(message["images"][0])))
    assert image.size == (8, 8)


def test_image_that_is_not_an_image_is_a_400_before_the_engine(gw, ollama_standin):
    bogus = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    with pytest.raises(openai.BadRequestError):
        client(gw).responses.create(model="VLM", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": bogus, "detail": "auto"}]}])
    assert not ollama_standin.state["requests"]


def test_function_tool_round_trip(gw, ollama_standin):
    c = client(gw)
    first = c.responses.create(model="VLM", input="add 2 and 3", tools=[TOOL])
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("add", {"city": "Hanoi"})]
    assert last_chat(ollama_standin)["tools"] == [{"type": "function", "function": {
        "name": "add", "description": "add two numbers", "parameters": TOOL["parameters"]}}]
    second = c.responses.create(model="VLM", tools=[TOOL], tool_choice="none", input=[
        {"role": "user", "content": "add 2 and 3"}, calls[0].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}])
    sent = last_chat(ollama_standin)["messages"]
    assert sent[1]["tool_calls"][0]["id"] == calls[0].call_id
    assert sent[2] == {"role": "tool", "content": "5", "tool_name": "add", "tool_call_id": calls[0].call_id}
    assert "tools" not in last_chat(ollama_standin) and second.output_text


def test_json_schema_format_becomes_ollama_format_and_reasoning_effort_think(gw, ollama_standin):
    client(gw).responses.create(model="VLM", input="x", reasoning={"effort": "minimal"},
                                text={"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}})
    sent = last_chat(ollama_standin)
    assert sent["format"] == SCHEMA and sent["think"] is False


def test_stream_events_in_order_and_final_response(gw):
    events = raw_events(gw, model="VLM", input="hello")
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == deltas and final.usage.output_tokens == 4
    with client(gw).responses.stream(model="VLM", input="hello") as stream:
        streamed = [event.type for event in stream]
        response = stream.get_final_response()
    assert streamed == kinds and response.output_text == deltas


def test_stream_function_calls(gw):
    events = raw_events(gw, model="VLM", input="add", tools=[TOOL, {**TOOL, "name": "mul"}])
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [item["name"] for item in added] == ["add", "mul"]
    with client(gw).responses.stream(model="VLM", input="add", tools=[TOOL, {**TOOL, "name": "mul"}]) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"city":"Hanoi"}'), ("mul", '{"city":"Hanoi"}')]


def test_midstream_engine_error_becomes_an_error_event(ollama_standin):
    config = ollama_config(ollama_standin.url)
    config["serving"]["models"].append({"name": "fail-midstream", "type": "llm"})
    with gateway(config) as gw:
        with httpx.stream("POST", gw.url + "/v1/responses", json={"model": "fail-midstream", "input": "x",
                                                                   "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "error" and "out of memory" in events[-1]["message"]
    EVENTS.validate_python(events[-1])


@pytest.mark.parametrize("body,param,status", [
    ({"store": True}, "store", 400),
    ({"previous_response_id": "resp_1"}, "previous_response_id", 400),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", 400),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]", 400),
    ({"input": []}, "input", 400),
    ({"max_output_tokens": 0}, "max_output_tokens", 400),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", 400),
    ({"model": "nope"}, "model", 404),
])
def test_refusals_have_envelopes_and_reach_no_engine(gw, ollama_standin, body, param, status):
    r = httpx.post(gw.url + "/v1/responses", json={"model": "VLM", "input": "x", **body})
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert r.headers["x-request-id"]
    assert not ollama_standin.state["requests"]


def test_get_on_responses_is_a_405_with_a_hint(gw):
    r = httpx.get(gw.url + "/v1/responses")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]


# -- the real llama.cpp engine (no /v1/responses of its own: served through its chat route) ---------------------


@pytest.mark.llama
def test_real_engine_create_and_stream(llama_url):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "openai", "base-url": llama_url + "/v1",
                          "models": [{"name": "tiny-llm", "type": "llm", "aliases": ["LLM"],
                                      "params": {"max-tokens": 4}}]}}
    with gateway(config) as gw:
        c = client(gw)
        response = c.responses.create(model="LLM", input="hello", max_output_tokens=3)
        Response.model_validate(response.model_dump())
        assert response.output_text and response.usage.output_tokens >= 1 and response.model == "tiny-llm"
        events = raw_events(gw, model="LLM", input="count", max_output_tokens=3)
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas and Response.model_validate(events[-1]["response"]).output_text == deltas
        with c.responses.stream(model="LLM", input="count") as stream:
            assert stream.get_final_response().output_text


# -- an engine with its own /v1/responses ---------------------------------------------------------------------


@pytest.fixture()
def responses_engine():
    from devkit.openai_standin import create_app

    app = create_app(["org/served-model"])
    with ThreadedServer(app) as server:
        server.state = app.state.standin
        yield server


def test_passthrough_renames_the_model_fills_defaults_and_relays(responses_engine):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "vllm", "vllm-base-url": responses_engine.url,
                          "models": [{"name": "org/served-model", "type": "llm", "aliases": ["LLM"],
                                      "params": {"max-tokens": 2, "temperature": 0.1}}]}}
    with gateway(config) as gw:
        c = client(gw)
        response = c.responses.create(model="LLM", input="hi", extra_headers={"x-request-id": "trace-7"})
        path, sent, headers = responses_engine.state["requests"][-1]
        assert path == "/v1/responses" and headers["x-request-id"] == "trace-7"
        assert sent == {"model": "org/served-model", "input": "hi", "max_output_tokens": 2, "temperature": 0.1}
        assert response.id == "resp_standin" and response.output_text == "alpha bravo "
        with c.responses.stream(model="LLM", input="hi", max_output_tokens=3) as stream:
            final = stream.get_final_response()
        assert final.output_text == "alpha bravo charlie "
        assert responses_engine.state["requests"][-1][1]["stream"] is True


def test_passthrough_checks_images_like_chat(responses_engine):
    config = {"host": {"platform": "dgpu"},
              "serving": {"engine": "vllm", "vllm-base-url": responses_engine.url,
                          "models": [{"name": "org/served-model", "type": "vlm", "engine": "vllm",
                                      "params": {"max-image-side": 64}}]}}
    with gateway(config) as gw:
        client(gw).responses.create(model="org/served-model", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "colour?"}, {"type": "input_image", "image_url": png_data_url(128),
                                                        "detail": "auto"}]}])
        content = responses_engine.state["requests"][-1][1]["input"][0]["content"]
        assert content[0] == {"type": "input_text", "text": "colour?"}
        image = Image.open(io.BytesIO(base64.b64decode(content[1]["image_url"].partition(",")[2])))
        assert image.size == (64, 64)  # downscaled to the model's max-image-side before the engine saw it
        bogus = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
        before = len(responses_engine.state["requests"])
        r = httpx.post(gw.url + "/v1/responses", json={"model": "org/served-model", "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": bogus}]}]})
        assert r.status_code == 400 and len(responses_engine.state["requests"]) == before


@pytest.mark.llama
def test_real_engine_behind_the_ollama_api():
    """The Ollama stand-in generating with the real llama.cpp engine (as the rig runs it)."""
    from devkit.ollama_standin import create_app

    from tests.support import tiny_gguf

    app = create_app(["tiny:1b"], gguf=str(tiny_gguf()))
    with ThreadedServer(app) as engine:
        config = {"host": {"platform": "js"}, "serving": {"ollama-base-url": engine.url,
                                                          "models": [{"name": "tiny:1b", "aliases": ["LLM"]}]}}
        with gateway(config) as gw:
            response = client(gw).responses.create(model="LLM", input="hello", max_output_tokens=4)
            assert response.output_text and 1 <= response.usage.output_tokens <= 4
            events = raw_events(gw, model="LLM", input="count", max_output_tokens=4)
            deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert deltas and Response.model_validate(events[-1]["response"]).output_text == deltas
