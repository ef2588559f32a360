"""Called by verify.yml on the controller: prove a deployed gateway with the official openai client.

    verify_gateway.py BASE_URL '{"chat": ["LLM", ...], "embeddings": ["Embedding"], "api_key": "...", "refuse_keyless": true}'

With api_key every call carries it; with refuse_keyless a request without it must get 401 (OpenAI's envelope).
"""

import json
import sys

import httpx
import openai
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

base, expect = sys.argv[1], json.loads(sys.argv[2])
key = expect.get("api_key") or "unused"
auth = {"Authorization": f"Bearer {key}"}
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
if expect.get("refuse_keyless"):
    for path in ("/v1/models", "/v1/chat/completions"):
        refused = httpx.request("GET" if path.endswith("models") else "POST", base + path, timeout=30,
                                json=None if path.endswith("models") else {"model": expect["chat"][0], "messages": []})
        assert refused.status_code == 401, f"keyless {path}: {refused.status_code} {refused.text[:200]}"
        assert refused.json()["error"]["code"] == "invalid_api_key", refused.text
    print("keyless requests refused (401)")
ready = httpx.get(base + "/health/ready", timeout=30, headers=auth)
assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
ids = {m.id for m in client.models.list()}
missing = set(expect["chat"]) | set(expect["embeddings"])
assert missing <= ids, f"/v1/models lacks {missing - ids}"
for alias in expect["chat"]:
    raw = client.chat.completions.with_raw_response.create(model=alias, max_tokens=4,
                                                            messages=[{"role": "user", "content": "hello"}])
    completion = ChatCompletion.model_validate(json.loads(raw.text))
    chunks = list(client.chat.completions.create(model=alias, max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "hello"}]))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[-1].choices[0].finish_reason in ("length", "stop"), chunks[-1]
    print(f"chat {alias} -> {completion.model}: {completion.choices[0].message.content!r}, stream {len(chunks)} chunks")
for name in expect["embeddings"]:
    raw = httpx.post(base + "/v1/embeddings", json={"model": name, "input": ["xin chao", "hello"]}, timeout=60,
                     headers=auth)
    parsed = CreateEmbeddingResponse.model_validate(raw.json())
    print(f"embeddings {name}: {len(parsed.data)} x {len(parsed.data[0].embedding)}")
print("gateway verified")
