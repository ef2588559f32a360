# Engine stand-ins for the rig (README, "Stand-ins"): Ollama's native API and vLLM's OpenAI server,
# both generating with the real llama.cpp engine on the tiny offline GGUF. Built FROM the rig's Debian image,
# offline, from wheels rig.sh downloaded into devkit/rig/context/wheels.
ARG BASE_IMAGE=vilms-rig/debian:bookworm-3

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY devkit/rig/context/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/standin/venv \
 && /opt/standin/venv/bin/pip install --no-index --find-links /tmp/wheels llama-cpp-python fastapi uvicorn \
        sse-starlette starlette-context pydantic-settings orjson

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/standin/venv/bin:$PATH PYTHONPATH=/opt/standin
COPY --from=build /opt/standin/venv /opt/standin/venv
COPY devkit/rig/context/tiny.gguf /opt/standin/tiny.gguf
COPY devkit/__init__.py devkit/ollama_standin.py devkit/vllm_standin.py /opt/standin/devkit/
COPY devkit/rig/standin-entry /usr/local/bin/standin-entry
COPY devkit/rig/ollama-cli /usr/local/bin/ollama
RUN chmod 0755 /usr/local/bin/standin-entry /usr/local/bin/ollama
EXPOSE 11434 8000
ENTRYPOINT ["standin-entry"]
