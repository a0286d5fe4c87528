"""What every verb module shares: the consoles."""

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
