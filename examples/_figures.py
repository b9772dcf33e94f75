"""What the examples share: a parser whose errors are one line, and to write their
outputs, a figure of one row of plots, and the table, figure and results of a study
(``paper_figure1.py``, ``study_eval_stats.py``).

Figures are drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg when
saved, never shown), imported only when a figure is made.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line: ``prog: error: message``, exit 2.

    argparse prints its usage block first; the flag and what it accepts is the one
    line a user needs (``--help`` lists the flags).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_out_flags(parser: Any, *, default_help: str) -> None:
    """Adds ``--out`` (default ``None``: the script's own folder) and ``--overwrite``."""
    parser.add_argument("--out", default=None, help=f"output directory ({default_help})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of a previous run in --out (without it they are kept "
        "and the run is refused)",
    )


def check_out(
    parser: Any,
    out: str,
    outputs: Sequence[str],
    *,
    overwrite: bool,
    remedy: str = "pass --overwrite to replace it, or another --out",
) -> None:
    """Refuses (``parser.error``) to write over a previous run's outputs without ``--overwrite``.

    Args:
        parser: the script's parser (its ``error`` names the flag and exits).
        out: the output directory.
        outputs: the file names the script writes there.
        overwrite: whether ``--overwrite`` was given.
        remedy: what the error tells the user to do.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"argument --out: {out!r} is a file, expected a directory")
    found = [f for f in outputs if os.path.exists(os.path.join(out, f))]
    if found and not overwrite:
        parser.error(f"argument --out: {out!r} holds a previous run ({', '.join(found)}); {remedy}")


def new_figure(ncols: int, *, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with one row of ``ncols`` plots; returns ``(figure, axes)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(1, ncols)


def save_figure(fig: Any, axes: Sequence[Any], path: str, *, title: str, dpi: int) -> None:
    """Gives every plot of ``axes`` a light grid, titles ``fig`` and writes it to ``path``."""
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=dpi)


def write_study(results: dict, lines: list[str], plot: Callable[[str], None], out: str) -> dict:
    """Writes a study's outputs to ``out`` and prints its table; returns ``results``.

    Args:
        results: the results, JSON-able, with the paths ``"markdown"`` (the
            table) and ``"png"`` (the figure); written to ``out/results.json``.
        lines: the table, as Markdown lines.
        plot: draws the figure to the path it is given.
        out: the output directory.

    Returns:
        ``results``.
    """
    with open(results["markdown"], "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results["png"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(lines))
    print(f"figure: {results['png']}")
    return results
