"""Every command-line option explains itself: a help text, and a default only where it means something."""

import argparse
import re

import pytest

from aaa_core.cli import build_parser as cli_parser
from benchmarks.generate_speed import build_parser as generate_speed_parser
from benchmarks.quality import build_parser as quality_parser
from benchmarks.train_throughput import build_parser as train_throughput_parser
from training.config import build_parser as training_parser


def _generate_subparser() -> argparse.ArgumentParser:
    commands = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["generate"]


PARSERS = {
    "python -m aaa_core generate": _generate_subparser,
    "python -m training": training_parser,
    "python -m benchmarks.generate_speed": generate_speed_parser,
    "python -m benchmarks.train_throughput": train_throughput_parser,
    "python -m benchmarks.quality": quality_parser,
}


@pytest.mark.parametrize("command", PARSERS)
def test_every_option_has_a_help_text(command):
    parser = PARSERS[command]()
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.help is None]
    assert silent == [], f"{command}: options without help: {silent}"


@pytest.mark.parametrize("command", PARSERS)
def test_defaults_are_printed_once_and_never_empty(command):
    text = " ".join(PARSERS[command]().format_help().split())  # undo argparse's line wrapping
    assert "(default: None)" not in text
    assert not re.search(r"\(default: ?\)", text), "a blank default is printed"
    for entry in re.split(r"\s(?=--?[a-z])", text):
        assert entry.count("(default:") <= 1, f"{command}: default printed twice in {entry!r}"


def test_generate_help_states_the_defaults_users_ask_about():
    text = " ".join(_generate_subparser().format_help().split())
    assert "--steps STEPS Euler sampling steps, up to 10000 (default: 30)" in text
    assert "(default: a single space, as the reference)" in text
    assert "(default: download step-600000 from ModelScope)" in text
