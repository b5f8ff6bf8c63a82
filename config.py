"""Printing and saving a run's effective configuration.

Every stage prints its configuration before doing any work and saves it next to
its outputs, so a CSV or checkpoint found months later says how it was made.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import environment
from io_utils import write_json


def to_dict(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-friendly dict of parsed arguments (paths become strings)."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else dict(args).items()
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in items}


def print_config(cfg: Mapping[str, Any], title: str) -> None:
    """Print the effective configuration as aligned ``key: value`` lines."""
    width = max((len(k) for k in cfg), default=0)
    print(f"== {title}: effective config ==")
    for key in sorted(cfg):
        print(f"  {key:<{width}} : {cfg[key]}")
    sys.stdout.flush()


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save the configuration, with the environment it ran in, as JSON, atomically."""
    return write_json({"config": to_dict(cfg), "environment": environment.describe()}, path)
