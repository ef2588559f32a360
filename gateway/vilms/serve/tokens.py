"""Token-id arrays as embeddings input, the way OpenAI takes them: cl100k_base ids decoded back to text.

LangChain's `OpenAIEmbeddings` (default settings) tokenises with tiktoken and sends the ids, not the text. The
engines behind the gateway use their own tokenizers, so ids are decoded to text here and every engine gets
text. The encoding file ships inside the package (`_data/cl100k_base.tiktoken`, checked against tiktoken's
own hash): nothing is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

from vilms.errors import BadRequest

CL100K_FILE = Path(__file__).resolve().parents[1] / "_data" / "cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
MAX_TOKENS_PER_INPUT = 8192


@functools.cache
def cl100k() -> Any:
    """The cl100k_base encoding from the packaged file (loaded once per process, ~0.3 s)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(CL100K_FILE), expected_hash=CL100K_SHA256)
    return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=CL100K_SPECIAL)


def is_token_input(value: Any) -> bool:
    """A list of ints, or a list of lists of ints (what the schema lets through besides strings)."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    return isinstance(first, int) or (isinstance(first, list) and all(isinstance(r, list) for r in value))


def _decode(rows: list[list[int]]) -> list[str]:
    encoding = cl100k()
    known = encoding.n_vocab
    texts = []
    for i, row in enumerate(rows):
        if not row:
            raise BadRequest(f"input[{i}] is an empty token array", param="input")
        if len(row) > MAX_TOKENS_PER_INPUT:
            raise BadRequest(f"input[{i}] has {len(row)} tokens; at most {MAX_TOKENS_PER_INPUT}", param="input")
        for token in row:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < known:
                raise BadRequest(f"input[{i}] holds {token!r}, which is not a cl100k_base token id", param="input")
        try:
            texts.append(encoding.decode(row, errors="replace"))
        except Exception as exc:  # ids inside the range that name no token
            raise BadRequest(f"input[{i}] holds ids that are not cl100k_base tokens", param="input") from exc
    return texts


async def decode_token_input(value: Any) -> Any:
    """`value` unchanged unless it is token ids; then the texts they spell (decoded off the event loop)."""
    if not is_token_input(value):
        return value
    rows = [value] if isinstance(value[0], int) else value
    return await asyncio.to_thread(_decode, rows)
