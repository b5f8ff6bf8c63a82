"""The errors that are the user's to fix, and the scripts' entry point that reports them.

A bad CSV row, a missing image, a foreign checkpoint, a held lock or missing pretrained
weights each carry a one-line message naming the file (and row) at fault; a traceback
would only bury it. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from engine import ResumeError
from io_utils import LockError
from models import CheckpointError, PretrainedWeightsError
from unified_dataset import DataError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DataError, CheckpointError, PretrainedWeightsError, LockError, FileNotFoundError, ResumeError)


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse the command line, call ``main``; an expected error exits 1 with its one line."""
    args = parser.parse_args()
    try:
        main(args)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
