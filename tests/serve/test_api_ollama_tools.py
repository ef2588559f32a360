"""What real clients hit on the Ollama engine: tools, tool results, thinking, logprobs, model lookup, request ids.

Everything goes through the gateway to the Ollama stand-in, which records each request body and its headers,
and is checked with the official `openai` client (its accumulated stream and its own types).
"""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support import gateway

TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
         for name in ("add", "mul")]
ASK = [{"role": "user", "content": "add and multiply 2 and 3"}]


def config(url: str) -> dict:
    return {"host": {"platform": "dgpu"},
            "serving": {"engine": "ollama", "base-url": url,
                        "models": [{"name": "llama3.2:1b", "type": "llm", "aliases": ["LLM"]},
                                   {"name": "org/tagged-model", "type": "llm"}]}}


@pytest.fixture()
def gw(ollama_standin):
    with gateway(config(ollama_standin.url)) as server:
        yield server


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def last_chat(standin) -> dict:
    return [body for kind, body in standin.state["requests"] if kind == "chat"][-1]


def post(gw, **body) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json={"model": "LLM", "messages": ASK, **body}, timeout=30)


def test_streamed_parallel_tool_calls_stay_separate_in_the_accumulated_completion(gw, ollama_standin):
    with client(gw).chat.completions.stream(model="LLM", messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add", "mul"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Hanoi"}, {"city": "Hanoi"}]
    assert len({c.id for c in calls}) == 2
    assert final.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_keeps_the_first_call(gw):
    completion = client(gw).chat.completions.create(model="LLM", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["add"]
    with client(gw).chat.completions.stream(model="LLM", messages=ASK, tools=TOOLS,
                                            parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["add"]


def test_tool_results_keep_their_call(gw, ollama_standin):
    """The assistant's call ids reach Ollama, and each tool result is named after the call it answers."""
    first = client(gw).chat.completions.create(model="LLM", messages=ASK, tools=TOOLS)
    calls = first.choices[0].message.tool_calls
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": str(5 if c.function.name == "add" else 6)} for c in calls]
    client(gw).chat.completions.create(model="LLM", messages=history, tool_choice="none", tools=TOOLS)
    sent = last_chat(ollama_standin)["messages"]
    assistant = sent[1]
    assert [c["id"] for c in assistant["tool_calls"]] == [c.id for c in calls]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["add", "mul"]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Hanoi"}  # an object, as Ollama wants
    tools = sent[2:]
    assert [(t["role"], t["tool_name"], t["tool_call_id"], t["content"]) for t in tools] == [
        ("tool", "add", calls[0].id, "5"), ("tool", "mul", calls[1].id, "6")]


@pytest.mark.parametrize("effort,think", [("none", False), ("minimal", False), ("low", "low"), ("high", "high")])
def test_reasoning_effort_maps_to_think(gw, ollama_standin, effort, think):
    assert post(gw, reasoning_effort=effort, max_tokens=1).status_code == 200
    assert last_chat(ollama_standin)["think"] is think if isinstance(think, bool) else \
        last_chat(ollama_standin)["think"] == think


def test_unknown_reasoning_effort_is_a_400(gw, ollama_standin):
    r = post(gw, reasoning_effort="extreme")
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    assert not ollama_standin.state["requests"]


def test_logprobs_reach_ollamas_native_api_and_come_back_in_openai_shape(gw, ollama_standin):
    raw = post(gw, logprobs=True, top_logprobs=2, max_tokens=3).json()
    sent = last_chat(ollama_standin)
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    completion = ChatCompletion.model_validate(raw)
    content = completion.choices[0].logprobs.content
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob == -0.25 for t in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_logprobs_in_stream_chunks(gw):
    stream = client(gw).chat.completions.create(model="LLM", messages=ASK, logprobs=True, max_tokens=2, stream=True)
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) == 2
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        assert [t.token for t in chunk.choices[0].logprobs.content] == [chunk.choices[0].delta.content]


def test_without_logprobs_nothing_is_asked_and_top_logprobs_alone_is_refused(gw, ollama_standin):
    post(gw, max_tokens=1)
    assert "logprobs" not in last_chat(ollama_standin)
    r = post(gw, top_logprobs=3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post(gw, logprobs=True, top_logprobs=21)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_standin_logprobs_match_the_ollama_clients_types(ollama_standin):
    reply = ollama.Client(host=ollama_standin.url).chat(model="llama3.2:1b", messages=ASK, logprobs=True,
                                                        top_logprobs=2, options={"num_predict": 2})
    assert isinstance(reply, ollama.ChatResponse) and len(reply.logprobs) == 2


def test_models_retrieve_names_aliases_and_unknowns(gw):
    c = client(gw)
    model = c.models.retrieve("llama3.2:1b")
    assert model.id == "llama3.2:1b" and model.model_extra["engine"] == "ollama"
    alias = c.models.retrieve("LLM")
    assert alias.model_extra["alias_of"] == "llama3.2:1b"
    assert c.models.retrieve("org/tagged-model").id == "org/tagged-model"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


def test_request_id_is_forwarded_to_the_engine(gw, ollama_standin):
    r = post(gw, max_tokens=1, stream=True)
    generated = r.headers["x-request-id"]
    assert ollama_standin.state["headers"][-1][1]["x-request-id"] == generated
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-request-id": "trace-42"},
                   json={"model": "LLM", "messages": ASK, "max_tokens": 1})
    assert r.headers["x-request-id"] == "trace-42"
    assert ollama_standin.state["headers"][-1][1]["x-request-id"] == "trace-42"


def test_tool_choice_none_sends_no_tools(gw, ollama_standin):
    completion = client(gw).chat.completions.create(model="LLM", messages=ASK, tools=TOOLS, tool_choice="none",
                                                    max_tokens=2)
    assert "tools" not in last_chat(ollama_standin)
    assert completion.choices[0].message.tool_calls is None and completion.choices[0].message.content


def test_tool_choice_named_sends_only_that_tool(gw, ollama_standin):
    completion = client(gw).chat.completions.create(
        model="LLM", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "mul"}})
    assert [t["function"]["name"] for t in last_chat(ollama_standin)["tools"]] == ["mul"]
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["mul"]


def test_tool_choice_required_and_auto_send_every_tool(gw, ollama_standin):
    for choice in ("required", "auto"):
        client(gw).chat.completions.create(model="LLM", messages=ASK, tools=TOOLS, tool_choice=choice)
        assert [t["function"]["name"] for t in last_chat(ollama_standin)["tools"]] == ["add", "mul"]


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "div"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
])
def test_tool_requests_ollama_cannot_honour_are_refused_before_the_engine(gw, ollama_standin, body, param):
    r = post(gw, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert not ollama_standin.state["requests"]


def test_tool_choice_none_with_response_format_uses_the_format(gw, ollama_standin):
    assert post(gw, tools=TOOLS, tool_choice="none", response_format={"type": "json_object"}).status_code == 200
    sent = last_chat(ollama_standin)
    assert sent["format"] == "json" and "tools" not in sent


def test_malformed_tools_are_a_400(gw, ollama_standin):
    r = post(gw, tools={"type": "function"}, tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert not ollama_standin.state["requests"]
