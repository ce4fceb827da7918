"""The ``qvlm`` command line: thin wrappers that build configs and call library functions.

Each subcommand lives in its own module with ``register(subparsers)``; the module's handler
returns an exit code. User errors raise :class:`qvlm.errors.QVLMError`, which :func:`main` turns
into a one-line message on stderr and exit code 2 (no traceback; ``qvlm --debug`` shows it). An
``OSError`` that escapes (a disk filling up, a file vanishing) is reported the same way. See
docs/errors.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from qvlm.errors import QVLMError

# subcommand modules, in the order --help lists them
COMMANDS = [
    "qvlm.cli.demo",
    "qvlm.cli.sample",
    "qvlm.cli.train",
    "qvlm.cli.generate",
    "qvlm.cli.eval",
    "qvlm.cli.inspect",
    "qvlm.cli.exact",
    "qvlm.cli.proxy",
]


# what allocators say when a request cannot be met (CPU: "can't allocate memory"; CUDA: "out of memory";
# torch.OutOfMemoryError is a RuntimeError)
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"qvlm: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qvlm",
        description=(
            "Q-functions and V-functions for language models: sample and score text, train Q/V "
            "heads offline (ILQL) or a prefix scorer, steer generation with them, evaluate, and "
            "check learners against exact optimal values on small token MDPs."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, help="the step to run (qvlm COMMAND --help)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback after the one-line message"
    )
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (QVLMError, OSError) as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        if isinstance(err, OSError):  # escaped a library call: the file, the OS's words and what to do
            from qvlm.fileio import os_error

            err = os_error(None, err, "access")
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message holds
        print(f"qvlm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # an allocator's failure: one line; other errors are qvlm bugs
        text = " ".join(str(err).split())
        if not isinstance(err, MemoryError) and not any(m in text for m in _OUT_OF_MEMORY):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(
            f"qvlm {args.command}: error: out of memory ({text[:200] or type(err).__name__}); the run asks for more "
            "memory than the device has: lower the sizes it asks for (--batch-size, --head-hidden, counts of "
            "responses, --max-new-tokens) or use a smaller model",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"qvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
