"""``python3 -m mpvss_ros`` and the ``mpvss`` command: the libraries are checked
(:mod:`mpvss_ros.dependencies`) before the command line and the engine are imported."""

from __future__ import annotations

import sys

from mpvss_ros.dependencies import exit_if_unmet


def main(argv: list[str] | None = None) -> int:
    """Run ``mpvss`` with ``argv`` (default ``sys.argv[1:]``); returns its exit status.

    Raises:
        SystemExit: 2 when a library is missing, broken or too old (one ``mpvss: error:`` line
            each), and whatever :func:`mpvss_ros.cli.main` raises.
    """
    exit_if_unmet("mpvss", 2)
    from mpvss_ros.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
