"""The Levante tokenizer: a byte-level BPE tokenizer.json with fixed special ids, and its HF side files.

Document convention (one rule, used by shards, evaluation, generation, serving and the HF export):
a document is `<|bos|> text <|eos|>`. Training streams concatenate such documents, evaluation scores
a document's tokens after its `<|bos|>`, generation continues `<|bos|> prompt`, and the exported
tokenizer.json carries a post-processor that prepends `<|bos|>`, so transformers' tokenizer and
`generate` see the same ids as Levante (the convention of DeepSeek's own tokenizer: bos 0, eos 1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, processors

from levante.errors import LevanteError
from levante.tokenizer.chat import CHAT_TEMPLATE
from levante.util import atomic_write_bytes

# Fixed ids 0..6: configs, chat templates and shards rely on them, whatever the corpus.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
MIN_MERGES = 8
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + MIN_MERGES

# ------------------------------------------------------------------------------------------ loading


class LevanteTokenizer:
    """A trained tokenizer.json (or a directory holding one), with Levante's fixed special ids.

    `encode` treats text literally: a document containing the string "<|eos|>" gets the bytes of that
    string, never the control token, so corpus text cannot forge document or chat boundaries. Pass
    `allow_special=True` to map special-token strings to their ids (e.g. for a rendered chat prompt).
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise LevanteError(f"tokenizer not found: {path}")
        raw = path.read_bytes()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
            self._special = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise LevanteError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self._tok.encode_special_tokens = True
        for want, tok in enumerate(SPECIAL_TOKENS):
            if self._tok.token_to_id(tok) != want:
                raise LevanteError(f"{path}: not a Levante tokenizer ({tok} should have id {want})")
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        tok = self._special if allow_special else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        tok = self._special if allow_special else self._tok
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index(BOS)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS)

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD)

    @property
    def end_id(self) -> int:
        """End of a chat turn: where an assistant's answer stops."""
        return SPECIAL_TOKENS.index(END)

    def encode_prompt(self, text: str) -> list[int]:
        """`<|bos|> text`: the context a document starts from (generation, serving, lm-eval)."""
        return [self.bos_id, *self.encode(text)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """`<|bos|> text <|eos|>` per text: what token shards hold."""
        return [[self.bos_id, *ids, self.eos_id] for ids in self.encode_batch(texts)]


def document_post_processor() -> processors.TemplateProcessing:
    """Prepends `<|bos|>` when a caller asks for special tokens (transformers does by default);
    Levante's own `encode` never applies it, so the same file serves both."""
    return processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                         special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])


def write_hf_tokenizer_files(tokenizer_json_path: str | Path, out_dir: str | Path,
                             model_max_length: int = 2048) -> list[Path]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json in `out_dir`, so that
    `AutoTokenizer.from_pretrained(out_dir)` works offline. Returns the files written."""
    src, out_dir = Path(tokenizer_json_path), Path(out_dir)
    LevanteTokenizer(src)  # refuse to export something that is not a Levante tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(src))
    if tok.post_processor is None:  # trained before the document convention: add the bos rule
        tok.post_processor = document_post_processor()
        atomic_write_bytes(target, tok.to_str(pretty=True).encode("utf-8"))
    elif not (target.exists() and target.resolve() == src.resolve()):
        atomic_write_bytes(target, src.read_bytes())
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,  # byte-level: decode must return the exact text
        "add_bos_token": True,  # done by tokenizer.json's post-processor (see document_post_processor)
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    written = [target]
    for name, obj in (("tokenizer_config.json", config),
                      ("special_tokens_map.json", {**specials,
                                                   "additional_special_tokens": list(SPECIAL_TOKENS[3:])})):
        atomic_write_bytes(out_dir / name, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())
        written.append(out_dir / name)
    return written


