-- wrk: POST a small OpenAI chat request (body from the BODY env var, else a default).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("AUTH") then wrk.headers["Authorization"] = os.getenv("AUTH") end
wrk.body = os.getenv("BODY") or '{"model":"mock","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
