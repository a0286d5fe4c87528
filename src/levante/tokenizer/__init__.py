"""Byte-level BPE tokenizer: language-balanced training, loading, fertility / parity reports."""

from levante.tokenizer.parity import Fertility, fertility, parity_report
from levante.tokenizer.train import (
    CHAT_TEMPLATE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    LangSample,
    LevanteTokenizer,
    TrainReport,
    sampling_shares,
    train_tokenizer,
    write_hf_tokenizer_files,
)

__all__ = [
    "CHAT_TEMPLATE", "MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "Fertility", "LangSample", "LevanteTokenizer",
    "TrainReport", "fertility", "parity_report", "sampling_shares", "train_tokenizer",
    "write_hf_tokenizer_files",
]
