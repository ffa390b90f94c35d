"""How the command line names the function a command runs, and reports usage errors."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from forge.settings import Settings

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace, Settings], int]


@dataclass(frozen=True, slots=True)
class Lazy:
    """``forge.cli.<module>.<function>``, imported when the command runs."""

    module: str
    function: str

    def resolve(self) -> Command:
        found: Command = getattr(importlib.import_module(f"forge.cli.{self.module}"), self.function)
        return found

    def __call__(self, args: argparse.Namespace, settings: Settings) -> int:
        return self.resolve()(args, settings)


class UsageParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)
