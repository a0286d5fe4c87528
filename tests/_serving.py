"""Shared by the server, chat-page and lm-eval tests: a tiny saved checkpoint and a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SERVE_MODEL = {"max_position_embeddings": 256, "num_nextn_predict_layers": 1}


def save_tiny_checkpoint(root: Path, ws) -> Path:
    """A run dir with one checkpoint of the tiny model, weights drawn wider than the default init so
    that greedy choices have clear winners (batched vs alone must not flip on a near-tie)."""
    import levante
    from levante.checkpoint import save_checkpoint
    from levante.config import TrainConfig

    cfg = TrainConfig.from_dict(ws.config_dict(model=SERVE_MODEL))
    torch.manual_seed(0)
    model = levante.Transformer(cfg.model)
    model.init_weights(std=0.2)
    save_checkpoint(root / "run", 0, model, None, {}, keep_last=1, tokenizer_path=ws.tokenizer,
                    config_text=cfg.dumps())
    return root / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
