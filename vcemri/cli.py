"""The ``vcemri`` program: one argparse tree, one error policy.

Expected failures (:class:`config.VcemriError`) print one line, ``vcemri: error: <reason>``
(a configuration with several problems prints one line per problem) and exit with the error's
code: 2 for configuration and usage errors, 1 for the rest. Anything else is a bug: it prints
a one-line internal error and exits 70, unless ``--debug`` asks for the traceback. Commands
are added here only once they work.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata

import config
import dicom_node
import simulation
import training
from config import VcemriError

from . import __version__, demo, process, study

EXIT_INTERNAL = 70  # EX_SOFTWARE, sysexits.h
EXIT_INTERRUPTED = 130
#: 128 + SIGPIPE: what a shell reports for a tool whose reader went away (`... | head -1`).
EXIT_BROKEN_PIPE = 141

#: Distributions whose versions ``vcemri version`` reports (what a bug report needs).
COMPONENTS = (
    "pydicom",
    "pynetdicom",
    "highdicom",
    "rt-utils",
    "torch",
    "SimpleITK",
    "numpy",
    "pydantic",
    "pydantic-settings",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
)

Handler = Callable[[argparse.Namespace], int]
log = logging.getLogger(__name__)


def _version(args: argparse.Namespace) -> int:
    print(f"vcemri {__version__}")
    if args.short:
        return 0
    print(f"python {platform.python_version()} ({platform.system()} {platform.machine()})")
    for name in COMPONENTS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name} {version}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    path = config.config_path(args.file or args.config)
    settings = config.load_settings(path)
    overrides = sorted(
        k for k in os.environ if k.upper().startswith("VCEMRI_") and k.upper() != config.CONFIG_ENV
    )
    print(f"# effective configuration: {path}")
    if overrides:
        print(f"# overridden from the environment: {', '.join(overrides)}")
    print(config.effective_yaml(settings), end="")
    print(f"configuration OK: {path}", file=sys.stderr)
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    print(config.reference_markdown(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (for ``--help`` and for tests)."""
    parser = argparse.ArgumentParser(
        prog="vcemri",
        description="vcemri: a DICOM node that synthesizes virtual contrast-enhanced T1w MRI "
        "for nasopharyngeal carcinoma radiotherapy planning. Research software, not a "
        "medical device.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default: ${config.CONFIG_ENV}, else the packaged default)",
    )
    parser.add_argument(
        "--log-format", choices=("human", "json"), default="human", help="console log format"
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        default="INFO",
        help="least severe level shown (default INFO)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and DEBUG logging"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    version = commands.add_parser("version", help="print the versions of vcemri and its parts")
    version.add_argument("--short", action="store_true", help="only vcemri's own version")
    version.set_defaults(handler=_version)

    cfg = commands.add_parser("config", help="check the configuration or print its reference")
    cfg_commands = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = cfg_commands.add_parser(
        "check",
        help="validate a configuration and print the effective settings (exit 2 if invalid)",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="file to check (default: --config)")
    check.set_defaults(handler=_config_check)
    reference = cfg_commands.add_parser(
        "reference", help="print every setting with its type, default and meaning (Markdown)"
    )
    reference.set_defaults(handler=_config_reference)

    demo.add_commands(commands)
    dicom_node.add_commands(commands)
    process.add_commands(commands)
    study.add_commands(commands)
    simulation.add_commands(commands)
    training.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    #: the command line as run, for what a command records about itself (a checkpoint's)
    args.command_line = shlex.join(["vcemri", *arguments])
    config.setup_logging(args.log_format, "DEBUG" if args.debug else args.log_level)
    handler: Handler = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's exit flush
        return code
    except BrokenPipeError:
        # The reader closed the pipe (`vcemri jobs list | head -1`): not an error of ours.
        # Stop quietly, and point stdout at /dev/null so that the interpreter's last flush
        # does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except VcemriError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"vcemri: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vcemri: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            log.debug("internal error", exc_info=True)
        print(
            f"vcemri: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug; run again with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
