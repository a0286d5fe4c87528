"""`levante` command line: a thin Typer layer over the library, one small module per verb group.

User mistakes surface as `LevanteError`; `main()` prints them on one line and exits with code 2.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.markup import escape

from levante.cli import checkpoint, data, launch, model, plan, serve, train
from levante.cli.common import err_console
from levante.errors import LevanteError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Levante: train, evaluate, sample and export DeepSeek-V3-class MoE language models.")
for group in (data, train, model, plan, serve, checkpoint, launch):
    group.register(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()  # click handles usage errors itself (message + exit 2); ours arrive here
    except LevanteError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        err_console.print(f"[red]error:[/red] {escape(str(e.strerror or e))}: {escape(str(e.filename))}",
                          soft_wrap=True)
        sys.exit(2)
