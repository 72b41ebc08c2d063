"""Progress bars of the preprocessing stages (loading, tokenizing, writing), on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


def progress_bar(progress: bool, **kwargs: Any) -> tqdm:
    """Make a tqdm progress bar, turned off when ``progress`` is False.

    ``disable`` is passed only to turn the bar off: an explicit argument would override tqdm's
    ``TQDM_*`` environment variables (``TQDM_DISABLE=1`` and the like).

    Args:
        progress: Whether to show the bar.
        **kwargs: Arguments for ``tqdm``.

    Returns:
        The bar.
    """
    if not progress:
        kwargs["disable"] = True
    return tqdm(**kwargs)


@contextlib.contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets``' progress bars off for a block when ``enabled`` is False.

    Never turns them on: the user may have turned them off (``HF_DATASETS_DISABLE_PROGRESS_BARS``).
    The previous setting comes back at the end, as the tests call the tool in-process.

    Args:
        enabled: Whether the bars may show.

    Yields:
        Nothing.
    """
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
