"""The `auditkit` command (and `python -m auditkit`). Its first statement records signals (see supervisor), so
that a signal during the command-line layer's imports is handled like any other."""
from auditkit.supervisor import catch_signals

catch_signals()


def main() -> None:
    from auditkit.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
