"""The Ollama stand-in keeps pulled and created models in its models directory, as Ollama does in its volume, so a
recreated container (what a rollback does) still lists them. Without that the rig reported rollbacks as down."""

from __future__ import annotations

import httpx

from devkit.ollama_standin import create_app
from tests.support import ThreadedServer


def test_pulled_models_survive_a_restart(tmp_path):
    with ThreadedServer(create_app([], store=tmp_path)) as first:
        assert httpx.post(first.url + "/api/pull", json={"model": "qwen2.5:3b", "stream": False}).status_code == 200
        created = httpx.post(first.url + "/api/create", json={"model": "derived", "from": "qwen2.5:3b"})
        assert created.status_code == 200
    with ThreadedServer(create_app([], store=tmp_path)) as second:
        names = [m["name"] for m in httpx.get(second.url + "/api/tags").json()["models"]]
    assert names == ["derived:latest", "qwen2.5:3b"]


def test_without_a_store_nothing_is_kept(tmp_path):
    with ThreadedServer(create_app([])) as first:
        httpx.post(first.url + "/api/pull", json={"model": "qwen2.5:3b", "stream": False})
    with ThreadedServer(create_app([], store=tmp_path)) as second:
        assert httpx.get(second.url + "/api/tags").json()["models"] == []
