"""Runs under the LlamaIndex venv (`make install` builds .venv-llamaindex; it pins openai 2, the project openai 3).

LlamaIndex's `OpenAILike` in its default mode (is_chat_model False: the legacy completions endpoint) against the
gateway URL given as argv[1]: complete, stream_complete, and chat (which this mode turns into a prompt).
Prints one JSON object for the test to check; any client-side error is raised, so the process fails.
"""

from __future__ import annotations

import json
import sys

from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike


def main(base_url: str) -> None:
    llm = OpenAILike(model="LLM", api_base=base_url + "/v1", api_key="x", max_retries=0, max_tokens=4,
                     context_window=2048)
    whole = llm.complete("Once upon a time")
    deltas = [part.delta for part in llm.stream_complete("Once upon a time")]
    chat = llm.chat([ChatMessage(role="user", content="Say hi")])
    print(json.dumps({"is_chat_model": llm.metadata.is_chat_model, "complete": whole.text, "deltas": deltas,
                      "chat": chat.message.content, "raw_object": getattr(whole.raw, "object", None)}))


if __name__ == "__main__":
    main(sys.argv[1])
