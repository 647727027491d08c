"""Tokenizer and chat template read from a model directory (tokenizer.json + tokenizer_config)."""
from __future__ import annotations

import functools
import json
from pathlib import Path


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        eos = [self._tok.eos_token_id] if self._tok.eos_token_id is not None else []
        for name in ("config.json", "generation_config.json"):
            f = model_dir / name
            if f.exists():
                e = json.loads(f.read_text()).get("eos_token_id")
                eos += e if isinstance(e, list) else ([] if e is None else [e])
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.bos_token_id: int | None = self._tok.bos_token_id
        self.vocab_size: int = len(self._tok)
        self._special_ids = frozenset(self._tok.all_special_ids)  # the tokenizer rebuilds its list per access

    def longest_token_bytes(self) -> int:
        """UTF-8 bytes of the longest token's text: a text of more than n times this many bytes
        has more than n tokens, known without tokenizing it (computed once)."""
        if getattr(self, "_longest", None) is None:
            vocab = self._tok.get_vocab()
            self._longest = max(len(self._tok.convert_tokens_to_string([t]).encode("utf-8", "replace")) for t in vocab)
            self._longest = max(self._longest, 1)
        return self._longest

    def token_text(self, token_id: int) -> str:
        """One token's text alone (special tokens included; a piece of a multi-byte character
        shows as U+FFFD)."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's exact bytes. Byte-level BPE vocabularies spell each byte as one printable
        character (_byte_level_alphabet); other vocabularies: the UTF-8 of token_text."""
        piece = self._tok.convert_ids_to_tokens(int(token_id))
        decode = _byte_level_alphabet()
        if isinstance(piece, str) and piece and all(c in decode for c in piece) and \
                int(token_id) not in self._special_ids:
            return bytes(decode[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # render then encode without extra specials: the template already places them
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of byte-level BPE: bytes that are printable Latin-1 characters stand for
    themselves, the other 68 (controls, space, soft hyphen, ...) for code points 256, 257, ... in
    byte order."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    out = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in out.values()]
    out.update({chr(256 + i): b for i, b in enumerate(others)})
    return out


class StreamDecoder:
    # Incremental detokenizer: decodes a short window and emits only the text that got longer,
    # holding back while the tail is an incomplete UTF-8 sequence (decodes to U+FFFD).
    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: text before it is final
        self.read_offset = 0  # ids[prefix_offset:read_offset] decode to text already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(done):]
