"""Byte-level BPE tokenizer: the tokenizer class, the chat format, language-balanced training, parity."""

from levante.tokenizer.chat import CHAT_TEMPLATE, chat_segments, render_chat
from levante.tokenizer.parity import Fertility, fertility, parity_report
from levante.tokenizer.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    LevanteTokenizer,
    write_hf_tokenizer_files,
)
from levante.tokenizer.train import LangSample, TrainReport, sampling_shares, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "Fertility", "LangSample", "LevanteTokenizer",
    "TrainReport", "chat_segments", "fertility", "parity_report", "render_chat", "sampling_shares",
    "train_tokenizer", "write_hf_tokenizer_files",
]
