"""Fixtures shared by the tool tests."""

import pytest

from tests.tools.data_helpers import tool_runner


@pytest.fixture
def run_tool(tmp_path_factory, capsys):
    """``run_tool(*args) -> (exit code, stdout, stderr)`` of an in-process ``main``."""
    return tool_runner(tmp_path_factory, capsys)
