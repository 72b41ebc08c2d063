"""Reading Megatron-Core 0.19.2's training log: the one parser the tools, tests and benchmarks use.

Megatron prints (``megatron/training/training.py``, ``training_log`` and ``evaluate_and_print``):

- one line per logged iteration, fields separated by ``|``::

    [2026-12-05 10:00:00] iteration        5/     300 | consumed samples:           20 |
    elapsed time per iteration (ms): 812.3 | learning rate: 3.000000E-03 | global batch size:
    4 | lm loss: 5.512345E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped
    iterations:   0 | number of nan iterations:   0 |

  (one line in the log; wrapped here);
- ``validation loss at iteration N on validation set | lm loss value: X | lm loss PPL: Y |``;
- the argument dump at start-up, one ``  name ........ value`` line per argument.

Only this module knows those formats; a change in Megatron's log is fixed here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ITERATION_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|(.*)$", re.MULTILINE)
_VALIDATION_LINE = re.compile(
    r"validation loss at iteration (\d+) on validation set \| lm loss value: (\S+) \|"
)
_ARGUMENT_LINE = re.compile(r"^  (\w+) \.{3,} (.*)$", re.MULTILINE)  # "  seq_length ...... 128"

# What a run's log contains once it evaluated on the validation set (sweep.sbatch greps it).
VALIDATION_MARKER = " on validation set | lm loss value: "


@dataclass(frozen=True)
class IterationLog:
    """One logged training iteration.

    Attributes:
        iteration: iterations done, counting this one.
        train_iters: ``--train-iters`` of the run.
        fields: every ``name: value`` of the line, as printed (``"lm loss"``, ``"learning
            rate"``, ``"consumed samples"``, ``"elapsed time per iteration (ms)"``, ...).
    """

    iteration: int
    train_iters: int
    fields: dict[str, str]

    def number(self, name: str) -> float:
        """The field ``name`` as a float.

        Raises:
            KeyError: the line has no such field (the message lists those it has).
        """
        if name not in self.fields:
            raise KeyError(
                f"no {name!r} in Megatron's iteration line; it has {sorted(self.fields)}"
            )
        return float(self.fields[name])


def iterations(text: str) -> list[IterationLog]:
    """Every logged training iteration in ``text``, in log order (a resumed run repeats some)."""
    logs = []
    for iteration, train_iters, rest in _ITERATION_LINE.findall(text):
        fields = {}
        for part in rest.split("|"):
            name, colon, value = part.partition(":")
            if colon and value.strip():
                fields[name.strip()] = value.strip()
        logs.append(IterationLog(int(iteration), int(train_iters), fields))
    return logs


def losses(text: str) -> dict[int, float]:
    """``{iteration: lm loss}`` of the logged training iterations (the last line of each wins)."""
    return {
        log.iteration: log.number("lm loss") for log in iterations(text) if "lm loss" in log.fields
    }


def validation_losses(text: str) -> list[tuple[int, float]]:
    """``[(iteration, validation lm loss), ...]`` in log order."""
    return [(int(it), float(loss)) for it, loss in _VALIDATION_LINE.findall(text)]


def arguments(text: str) -> dict[str, str]:
    """Megatron's argument dump as ``{name: printed value}`` (a later dump, a relaunch, wins)."""
    return dict(_ARGUMENT_LINE.findall(text))
