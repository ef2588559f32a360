"""GPU check for issue 14: the gateway's local embeddings on CUDA vs one direct encode(), same sentences.

Extends ../shared/gpu-embed-check/gpu_embed.py (same random-weight MiniLM-L6-shaped model, same sentences, best of 3):
direct encode() at 64/256/1024 on CUDA; then gateways with `device: cuda` and the schema's CUDA batch defaults:
1 worker in-process, 1 worker unbatched, and N workers sharing one encoder process (WORKERS, default "2,4"), each
answering n concurrent one-sentence requests and ONE request carrying n inputs; peak RSS (VmHWM) and GPU memory
(nvidia-smi, per process tree) of each gateway. Prints one JSON object and writes $OUT/gpu_embed.json.
Targets (issue 14): one request with 1024 inputs >= 0.8 of direct; 1024 concurrent one-sentence requests >= 0.5 of
direct with the recommended worker count and >= 2 x 3,034 sentences/s.
"""
import asyncio, json, os, shutil, socket, subprocess, sys, time, random, urllib.request
import torch

NS = [int(x) for x in os.environ.get("NS", "64,256,1024").split(",")]
WORKERS = [int(x) for x in os.environ.get("WORKERS", "2,4").split(",")]
here = os.path.dirname(os.path.abspath(__file__))
KIT = os.environ.get("KIT", here)
GATEWAY_SRC = os.environ["GATEWAY_SRC"]
OUT = os.environ.get("OUT", "/tmp/out")
out = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": sys.version.split()[0]}
mdir = "/tmp/minilm-random"
if not os.path.exists(mdir):
    from transformers import BertConfig, BertModel
    cfg = BertConfig.from_pretrained(os.path.join(KIT, "minilm"))
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(mdir, safe_serialization=True)
    for f in os.listdir(os.path.join(KIT, "minilm")):
        p = os.path.join(KIT, "minilm", f)
        if os.path.isdir(p):
            shutil.copytree(p, os.path.join(mdir, f), dirs_exist_ok=True)
        elif f != "config.json":
            shutil.copy(p, mdir)
from sentence_transformers import SentenceTransformer
import sentence_transformers
out["sentence_transformers"] = sentence_transformers.__version__
words = "the a gateway model fleet jetson edge image server quick brown fox jumps over lazy dog serves answer token stream batch".split()
rng = random.Random(1)
sents = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(1024)]

m = SentenceTransformer(mdir, device="cuda")
m.encode(sents[:64], batch_size=64)
for n in NS:
    best = 1e9
    for bs in sorted({64, 256, n}):
        for _ in range(3):
            t = time.perf_counter(); m.encode(sents[:n], batch_size=bs); torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    out[f"direct_n{n}_sps"] = round(n / best, 1)
del m
torch.cuda.empty_cache()


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def tree(pid):
    pids, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
        except OSError:
            kids = []
        pids += kids; todo += kids
    return pids


def rss_peak_mb(pid):
    total = 0
    for p in tree(pid):
        try:
            total += next(int(l.split()[1]) for l in open(f"/proc/{p}/status") if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def gpu_mb(pid):
    pids = set(tree(pid))
    q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True).stdout
    return sum(int(mem) for p, mem in (l.split(", ") for l in q.strip().splitlines() if l) if int(p) in pids)


async def fire(port, n):
    import aiohttp
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as sess:
        async def one(body):
            async with sess.post(url, data=body, headers={"content-type": "application/json"}) as r:
                data = await r.read()
                assert r.status == 200, data[:300]
        bodies = [json.dumps({"model": "minilm", "input": sents[i]}).encode() for i in range(n)]
        await asyncio.gather(*(one(b) for b in bodies[:16]))
        many = single = 1e9
        for _ in range(3):
            t = time.perf_counter(); await asyncio.gather(*(one(b) for b in bodies)); many = min(many, time.perf_counter() - t)
        big = json.dumps({"model": "minilm", "input": sents[:n]}).encode()
        for _ in range(3):
            t = time.perf_counter(); await one(big); single = min(single, time.perf_counter() - t)
        return n / many, n / single


targets = [("1w", 1, {}), ("1w-unbatched", 1, {"batching": False})] + [(f"{w}w-shared", w, {"encoder": "shared"}) for w in WORKERS]
for name, workers, extra in targets:
    port = free_port()
    cfg = {"serving": {"engine": "ollama", "models": []}, "gateway": {"port": port, "workers": workers, "log-level": "warning"},
           "embedding": {"enabled": True, "model": "minilm", "path": mdir, "device": "cuda", "load": "eager", **extra}}
    open(f"/tmp/gw-{name}.yaml", "w").write(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=GATEWAY_SRC)
    p = subprocess.Popen([sys.executable, "-m", "vilms", "serve", "--config", f"/tmp/gw-{name}.yaml", "--host", "127.0.0.1",
                          "--port", str(port)], env=env, stdout=open(f"/tmp/gw-{name}.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(480):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1); break
            except Exception:
                time.sleep(0.5)
        time.sleep(1 + workers)
        row = {}
        for n in NS:
            many, single = asyncio.run(fire(port, n))
            row[f"concurrent_n{n}_sps"] = round(many, 1)
            row[f"concurrent_n{n}_vs_direct"] = round(many / out[f"direct_n{n}_sps"], 3)
            row[f"one_request_n{n}_sps"] = round(single, 1)
            row[f"one_request_n{n}_vs_direct"] = round(single / out[f"direct_n{n}_sps"], 3)
        row["rss_peak_mb"] = rss_peak_mb(p.pid)
        row["gpu_mb"] = gpu_mb(p.pid)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    except Exception as exc:
        out[name] = {"error": repr(exc), "log": open(f"/tmp/gw-{name}.log").read()[-2000:]}
    finally:
        p.terminate(); p.wait(timeout=30)
print(json.dumps(out, indent=1))
os.makedirs(OUT, exist_ok=True)
json.dump(out, open(os.path.join(OUT, "gpu_embed.json"), "w"), indent=1)
