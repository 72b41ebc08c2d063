"""mhc_megatron/training/known_warnings.py: the warnings every run without TransformerEngine or
Apex prints are hidden (and said to be, once); any other warning still shows."""

import logging
import warnings

import pytest

from mhc_megatron.training import known_warnings


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=1)  # as Megatron's modules do at import


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(known_warnings, "_installed", False)
    monkeypatch.delenv(known_warnings.SHOW_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def test_known_warnings_are_hidden_and_announced_once(fresh, capsys, caplog):
    assert known_warnings.install()
    assert not known_warnings.install()  # once per process
    out = capsys.readouterr().out
    assert out.count("> hidden:") == 1 and known_warnings.SHOW_ENV in out
    _warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    _warn("Apex is not installed. Falling back to Torch Norm")
    _warn("Something else went wrong")  # not a known one: shown
    assert [str(w.message) for w in fresh] == ["Something else went wrong"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED.")
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel: a real problem")
    assert [r.getMessage() for r in caplog.records] == ["GPTModel: a real problem"]


def test_the_environment_variable_shows_them(fresh, monkeypatch, capsys):
    monkeypatch.setenv(known_warnings.SHOW_ENV, "1")
    assert not known_warnings.install()
    _warn("Apex is not installed. Falling back to Torch Norm")
    assert len(fresh) == 1 and capsys.readouterr().out == ""
