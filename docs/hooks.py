"""MkDocs hook: publishes ``benchmarks/RESULTS.md`` and its chart as site pages.

The benchmark results live next to the benchmarks (``benchmarks/RESULTS.md`` links
its chart as ``results.png``); this hook adds both files to the site under
``benchmarks/`` so the page is the file itself, never a copy that could drift.
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLISHED = ("benchmarks/RESULTS.md", "benchmarks/results.png")


def on_files(files: Files, config) -> Files:
    """Adds the benchmark results to the site's files.

    Args:
        files: the files MkDocs found in ``docs/``.
        config: the MkDocs configuration.

    Returns:
        ``files`` with the published benchmark files added.
    """
    for uri in PUBLISHED:
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / uri)))
    return files
