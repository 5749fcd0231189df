"""The HTML report of `pcim render` and the CSV summary it shows: one self-contained page (the montage,
a table of the CSV's numbers per field with its thumbnail, the run's settings), images linked by relative
paths so the folder opens in a browser without a server and can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pcim_cli import __version__
from pcim_cli.errors import InputDataError
from pcim_cli.io import outputs, summary
from pcim_cli.io.store_view import FieldLevel, StorePlate

__all__ = ["find_csv", "read_csv", "records_table", "write_report"]

logger = logging.getLogger(__name__)


def find_csv(store: Path, plate_name: str, csv: Path | None, suggested: Path | None = None) -> Path | None:
    """The CSV summary: ``csv`` if given (must exist); else ``suggested`` (the plate.yaml's output.csv when
    its output.zarr is this store) or one beside the store named as pcim names it, if it exists."""
    if csv is not None:
        if not Path(csv).is_file():
            raise InputDataError(f"CSV summary {csv} does not exist: pass --csv with the file that "
                                 "`pcim explain` wrote (output.csv), or leave --csv out")
        return Path(csv)
    candidates = [*([Path(suggested)] if suggested else []), store.with_suffix(".csv"),
                  store.parent / f"{store.stem}_pcim.csv", store.parent / f"{plate_name}_pcim.csv"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        logger.info("no CSV summary beside %s (looked for %s); numbers come from the completion records",
                    store, ", ".join(c.name for c in candidates))
    return found


def read_csv(path: Path, wells: Sequence[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"Metadata_Well": str, "PCIM_ZarrPath": str}, keep_default_na=False,
                            na_values=[""])
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read the CSV summary {path} ({exc}): pass --csv with the file that "
                             "`pcim explain` wrote") from exc
    if "Metadata_Well" not in table.columns:
        raise InputDataError(f"{path} has no Metadata_Well column: it is not a pcim CSV summary; pass the "
                             "right one with --csv")
    return table[table["Metadata_Well"].isin(set(wells))].reset_index(drop=True)


def records_table(plate: StorePlate, fields: Sequence[FieldLevel]) -> pd.DataFrame:
    """The CSV summary's rows of the fields, made from their completion records (io/summary.py, as the
    CSV itself), for a store whose CSV is not found."""
    rows = [row for fld in fields if fld.record
            for row in summary.rows_from_record(plate.name, fld.well, fld.rel, fld.record)]
    return summary.build_summary(rows)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for key, item in value.items():
            out.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, value)]


def _settings_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, Any]], int]:
    """The first record's settings (flattened) and how many distinct settings fingerprints there are."""
    if not records:
        return [], 0
    first = records[0]
    rows = _flatten(first.get("settings", {}))
    rows += [(key, first.get(key)) for key in ("model_sha256", "fingerprint", "pcim_version") if key in first]
    return rows, len({r.get("fingerprint") for r in records})


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


REPORT_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: middle; font-size: 13px; }
th { background: #f0f0f0; }
img.thumb { width: 192px; }
img.montage { max-width: 100%; }
ol.objects { margin: 0; padding-left: 1.4em; white-space: nowrap; }
.failed { background: #fde8e8; }
.note { color: #666; }
"""


def write_report(path: Path, plate: StorePlate, table: pd.DataFrame, images: Mapping[str, str], montage: str,
                 records: Sequence[Mapping[str, Any]], csv: Path | None,
                 objects: Mapping[tuple[str, str], str] | None = None, shortcuts: Any = None) -> None:
    """Write the self-contained HTML report; ``images`` maps a field's store path to its PNG (relative),
    ``objects`` (store path, target) to the list of its top objects (plate.objects), ``shortcuts`` the
    shortcut picture (report/shortcuts.py; first on the page when it flags anything)."""
    settings, n_fingerprints = _settings_rows(records)
    columns = [c for c in table.columns if c not in ("Metadata_Plate", "PCIM_ZarrPath")]
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8">{outputs.REPORT_MARK}',
        f"<title>pcim report: {html.escape(plate.name)}</title><style>{REPORT_CSS}</style></head><body>",
        f"<h1>Plate {html.escape(plate.name)}</h1>",
        f'<p class="note">store {html.escape(str(plate.path))}; CSV '
        f"{html.escape(str(csv)) if csv else '(none found: numbers from the completion records)'}; "
        f"made by pcim {__version__} on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        *(_shortcut_section(shortcuts) if shortcuts is not None and shortcuts.report.findings else []),
        "<h2>Plate montage</h2>",
        f'<img class="montage" src="{html.escape(montage)}" alt="plate montage">',
        *(_shortcut_section(shortcuts) if shortcuts is not None and not shortcuts.report.findings else []),
        "<h2>Fields</h2>",
        _fields_table(table, columns, images, objects or {}),
        "<h2>Settings</h2>",
    ]
    if n_fingerprints > 1:
        parts.append(f'<p class="failed">{n_fingerprints} different settings fingerprints among these fields; '
                     "showing the first field's settings.</p>")
    parts.append("<table><tr><th>setting</th><th>value</th></tr>"
                 + "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in settings)
                 + "</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _shortcut_section(picture: Any) -> list[str]:
    """Where does the classifier look? The verdict's sentences (or one quiet line) and shortcuts.png."""
    findings = picture.report.findings
    judged = ", ".join(f"{t}: {n} wells" for t, n in picture.report.judged.items()) or "no well"
    lines = ([f'<p class="failed">shortcut: {html.escape(f.sentence)}</p>' for f in findings] if findings else
             [f'<p class="note">Shortcut QC: nothing suspicious (judged {html.escape(judged)}).</p>'])
    return ["<h2>Where does the classifier look? (shortcut QC)</h2>", *lines,
            f'<img class="montage" src="{html.escape(picture.path.name)}" alt="shortcut QC per well">']


def _short(column: str) -> str:
    """Table headers without the CSV's prefixes (the full name is the header's tooltip)."""
    for prefix in ("Metadata_", "PCIM_"):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def _fields_table(table: pd.DataFrame, columns: Sequence[str], images: Mapping[str, str],
                  objects: Mapping[tuple[str, str], str]) -> str:
    listed = bool(objects)
    head = ("<tr><th>map</th>" + ("<th>top objects</th>" if listed else "")
            + "".join(f'<th title="{html.escape(c)}">{html.escape(_short(c))}</th>' for c in columns) + "</tr>")
    body = []
    for _, row in table.iterrows():
        rel = row.get("PCIM_ZarrPath")
        src = images.get(rel) if isinstance(rel, str) else None
        thumb = (f'<a href="{html.escape(src)}"><img class="thumb" src="{html.escape(src)}" '
                 f'alt="{html.escape(str(rel))}"></a>') if src else '<span class="note">no map</span>'
        css = ' class="failed"' if row.get("PCIM_Status") == "failed" else ""
        tops = f"<td>{objects.get((rel, str(row.get('PCIM_Target'))), '')}</td>" if listed else ""
        body.append(f"<tr{css}><td>{thumb}</td>{tops}" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                    + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"
