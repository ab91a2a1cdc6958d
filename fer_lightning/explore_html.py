"""A self-contained HTML page: inline CSS, no scripts, figures embedded as data URIs or linked relatively."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f5f9; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; display: block; margin: .5em 0 1.2em; }
.note { color: #555; font-size: 14px; }
nav ul { columns: 2; }
"""


def escape(text: object) -> str:
    return html.escape(str(text))


def number(value: float, digits: int = 6) -> str:
    """A float for a table cell: 'inf' and '' (NaN) spelled out, otherwise `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def table(df: pd.DataFrame, table_id: str, caption: str = "", index: bool = True, digits: int = 6) -> str:
    """A DataFrame as an HTML table with an id (floats at `digits` significant digits, NaN blank)."""
    body = df.to_html(table_id=table_id, index=index, border=0, na_rep="",
                      float_format=lambda v: number(v, digits), escape=True)  # fmt: skip
    if caption:
        body = body.replace(">", f"><caption>{escape(caption)}</caption>", 1)
    return body


def figure(path: Path, report_dir: Path, alt: str, embed: bool) -> str:
    """An <img> of a PNG: embedded as a data URI, or linked relative to the report's folder."""
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    else:
        src = path.relative_to(report_dir).as_posix()
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def paragraph(text: str, note: bool = False) -> str:
    return f'<p class="note">{escape(text)}</p>' if note else f"<p>{escape(text)}</p>"


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: a title, a table of contents, then each (anchor, heading, html body) section."""
    toc = "".join(f'<li><a href="#{escape(a)}">{escape(h)}</a></li>' for a, h, _ in sections)
    body = "".join(f'<section id="{escape(a)}"><h2>{escape(h)}</h2>{content}</section>' for a, h, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{escape(title)}</h1><nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )
