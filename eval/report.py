"""Evaluation reports: Markdown / CSV / JSON tables, a pair x metric heatmap, a retrieval gallery.

``write_report(results, out_dir, title)`` takes the rows of :func:`eval.protocol.evaluate_pairs`
and writes, atomically (via :mod:`cdir.core.io`):

    results.md     title, the settings, the table (one row per directed pair, metric columns, the
                   mean row), notes defining each metric
    results.csv    the same rows, one column per key
    results.json   {"title", "settings", "columns", "results", "examples"}; NaN is written as null
    heatmap.png    pairs (and mean) x metrics, values annotated, colour scale 0-100
    gallery.png    (when there are examples) each sample query, then its top-k results,
    gallery.html   hits framed green, misses red, with rank, score and class; the HTML embeds its
                   thumbnails, so it can be moved or mailed on its own

matplotlib (Agg canvas, no pyplot state) and Pillow are imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.io import atomic_path, atomic_write, write_json, write_text
from eval.protocol import EXAMPLE_COLUMNS, META_COLUMNS, one_relevant, split_examples

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

HIT_COLOUR = (46, 160, 67)
MISS_COLOUR = (207, 34, 46)
QUERY_COLOUR = (31, 111, 235)
THUMB = 112
MAX_GALLERY_PNG_QUERIES = 120  # the PNG stays a reasonable size; the HTML shows every example

# What each column means: under every results.md and every comparison.md.
METRIC_NOTES = """\
Columns, all in percent. R is the number of gallery items of the query's class (the query itself
never counts); N the gallery size.
- P@k is the UCDIR precision: t = min(k, R); sum over the queries of the hits in the top t, divided
  by the sum of t (a micro-average, truncated by R: not standard precision; queries with R = 0 add
  nothing).
- prec@k is standard precision: hits in the top k / k, mean over all queries.
- recall@k is the fraction of the relevant gallery items found in the top k (hits in top k / R),
  mean over queries with R > 0.
- mAP@R (Musgrave et al. 2020) is (1/R) x the sum, over the hits among the top R ranks, of the
  precision at that rank; mean over queries with R > 0.
- mAP@All is the average precision over the whole ranked gallery (all N ranks): (1/R) x the
  sum, over every relevant item, of the precision at its rank; mean over queries with R > 0 (the
  mAP of CoDA and UEM). With R = 1 it is the mean reciprocal rank.
"""

NOTES = METRIC_NOTES + """\
Every image of the query domain is a query against every image of the gallery domain; ties go to
the lower manifest row. The mean row averages the pairs.
"""

ONE_RELEVANT_NOTE = "one relevant item per query: P@k = prec@1 = mAP@R; see recall@k"


def _metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for c in r:
            if c not in META_COLUMNS and c != "examples" and c not in cols:
                cols.append(c)
    return cols


def format_value(v: Any) -> str:
    """A table cell: floats with 2 decimals, NaN as n/a, None as empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def _md_cell(v: Any) -> str:
    return format_value(v).replace("|", "\\|")


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: pair, n_queries, n_gallery, then every metric column; below it, when
    every query has one relevant item, the line saying which columns are then one number."""
    rows, _ = split_examples(list(results))
    cols = ["pair", "n_queries", "n_gallery"] + _metric_columns(rows)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in rows:
        cells = [_md_cell(r.get(c)) for c in cols]
        if r.get("pair") == "mean":
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if one_relevant(rows):
        lines += ["", ONE_RELEVANT_NOTE]
    return "\n".join(lines) + "\n"


def aggregate_seeds(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The result rows of one evaluation per seed (same pairs) as one row per pair: every metric
    column's mean over the seeds under its own key, its sample standard deviation under
    ``"<column> std"`` (0 with one seed; NaN values left out), and ``seeds`` (how many). The mean
    row's figures are the mean and spread of the seeds' own pair means."""
    import statistics

    per_seed = [split_examples(list(rows))[0] for rows in runs]
    if not per_seed:
        return []
    cols = _metric_columns(per_seed[0])
    out = []
    for i, first in enumerate(per_seed[0]):
        row = {k: v for k, v in first.items() if k in META_COLUMNS}
        row["seeds"] = len(per_seed)
        for c in cols:
            vals = [float(rows[i][c]) for rows in per_seed
                    if rows[i].get(c) is not None and not math.isnan(float(rows[i][c]))]
            row[c] = statistics.fmean(vals) if vals else float("nan")
            row[f"{c} std"] = statistics.stdev(vals) if len(vals) > 1 else (
                0.0 if vals else float("nan"))
        out.append(row)
    return out


def format_seed_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """A Markdown table of :func:`aggregate_seeds` rows: pair, then "mean ± std" per column."""
    lines = ["| pair | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            m, sd = r.get(c), r.get(f"{c} std")
            cells.append("n/a" if m is None or math.isnan(m) else f"{m:.2f} ± {sd:.2f}")
        name = f"**{r['pair']}**" if r.get("pair") == "mean" else str(r.get("pair"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def jsonable(v: Any) -> Any:
    """``v`` with NaN as None and numpy scalars as Python numbers, for JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        return jsonable(v.item())
    return v


def write_report(
    results: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str,
    examples: Sequence[dict[str, Any]] | None = None,
    manifest: pd.DataFrame | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the report files into ``out_dir``; return {kind: path} for what was written.

    ``examples`` defaults to those embedded in ``results`` (``evaluate_pairs(keep_examples=n)``).
    ``manifest`` supplies image paths and class names an example lacks. ``settings`` (name ->
    value: what produced the numbers) goes under the title and into the JSON.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, embedded = split_examples(list(results))
    examples = list(examples) if examples is not None else embedded
    cols = _metric_columns(rows)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "heatmap": out / "heatmap.png"}

    head = "".join(f"- {k}: {v}\n" for k, v in (settings or {}).items())
    write_text(paths["md"], f"# {title}\n\n" + (head + "\n" if head else "")
               + f"{format_table(rows)}\n{NOTES}")
    fields = [c for c in META_COLUMNS if any(c in r for r in rows)] + cols
    with atomic_write(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in fields})
    write_json(paths["json"], jsonable({"title": title, "settings": dict(settings or {}),
                                        "columns": fields, "results": rows,
                                        "examples": examples}))
    _write_heatmap(rows, cols, paths["heatmap"], title)
    if examples:
        examples = [_complete(ex, manifest) for ex in examples]
        thumbs = _Thumbs()
        paths["gallery_png"] = out / "gallery.png"
        paths["gallery_html"] = out / "gallery.html"
        _write_gallery_png(examples[:MAX_GALLERY_PNG_QUERIES], paths["gallery_png"], thumbs)
        _write_gallery_html(examples, paths["gallery_html"], title, thumbs)
    return paths


# ---------------------------------------------------------------------------------------- heatmap


def _write_heatmap(rows: list[dict[str, Any]], cols: list[str], path: Path, title: str) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [str(r.get("pair", "")) for r in rows]
    data = np.array([[_num(r.get(c)) for c in cols] for r in rows], dtype=float).reshape(
        len(rows), len(cols))
    fig = Figure(figsize=(max(4.0, 0.9 * len(cols) + 2.5), max(2.5, 0.35 * len(rows) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=10)
    if data.size <= 600:  # annotate while the numbers stay legible
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                        fontsize=7, color="white" if np.isnan(v) or v < 60 else "black")
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------- gallery


def _complete(ex: dict[str, Any], manifest: pd.DataFrame | None) -> dict[str, Any]:
    """Fill paths / class names / ids an example lacks from the manifest."""
    if manifest is None:
        return ex
    ex = dict(ex)

    def get(col: str, row: int) -> str | None:
        return str(manifest[col].iloc[row]) if col in manifest.columns else None

    for col in EXAMPLE_COLUMNS:
        if f"query_{col}" not in ex and "query_row" in ex:
            ex[f"query_{col}"] = get(col, int(ex["query_row"]))
    items = []
    for it in ex.get("results", []):
        it = dict(it)
        for col in EXAMPLE_COLUMNS:
            if col not in it and "row" in it:
                it[col] = get(col, int(it["row"]))
        items.append(it)
    ex["results"] = items
    return ex


class _Thumbs:
    """Thumbnails by path, loaded once; unreadable images become a grey placeholder."""

    def __init__(self, size: int = THUMB):
        self.size = size
        self._cache: dict[str | None, Image.Image] = {}

    def get(self, path: str | None) -> Image.Image:
        from PIL import Image, ImageDraw

        if path in self._cache:
            return self._cache[path]
        try:
            if not path:
                raise FileNotFoundError
            from cdir.core.images import load_image

            img = load_image(path)
            img.thumbnail((self.size, self.size))
            tile = Image.new("RGB", (self.size, self.size), (255, 255, 255))
            tile.paste(img, ((self.size - img.width) // 2, (self.size - img.height) // 2))
        except Exception:  # a missing or corrupt image must not sink the report
            tile = Image.new("RGB", (self.size, self.size), (200, 200, 200))
            ImageDraw.Draw(tile).text((8, self.size // 2 - 6), "no image", fill=(90, 90, 90))
        self._cache[path] = tile
        return tile

    def data_uri(self, path: str | None) -> str:
        buf = io.BytesIO()
        self.get(path).save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _font(size: int):
    """DejaVu Sans from matplotlib's data (it has the → of pair names); else Pillow's default."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(
            str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except Exception:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _write_gallery_png(examples: list[dict[str, Any]], path: Path, thumbs: _Thumbs) -> None:
    from PIL import Image, ImageDraw

    border, pad, cap, head = 4, 6, 30, 18
    tile = THUMB + 2 * border
    k = max(len(ex.get("results", [])) for ex in examples)
    width = pad + (tile + pad) * (k + 1) + pad  # the query, a gap, then k results
    row_h = head + tile + cap + pad
    canvas = Image.new("RGB", (width, pad + row_h * len(examples)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(10)
    chars = THUMB // 6
    for i, ex in enumerate(examples):
        y = pad + i * row_h
        draw.text((pad, y), f"{ex.get('pair', '')}   query row {ex.get('query_row', '')}   "
                            f"R = {ex.get('n_relevant', '')}", fill=(0, 0, 0), font=font)
        y += head
        x = pad
        _tile(canvas, draw, thumbs.get(ex.get("query_path")), x, y, QUERY_COLOUR, border)
        draw.text((x, y + tile + 2), "query", fill=QUERY_COLOUR, font=small)
        draw.text((x, y + tile + 14), _clip(str(ex.get("query_class_name", ex.get("query_label"))),
                                            chars), fill=(0, 0, 0), font=small)
        x += tile + 2 * pad
        for it in ex.get("results", []):
            colour = HIT_COLOUR if it.get("hit") else MISS_COLOUR
            _tile(canvas, draw, thumbs.get(it.get("path")), x, y, colour, border)
            draw.text((x, y + tile + 2), f"#{it.get('rank')}  {it.get('score', 0):.3f}",
                      fill=colour, font=small)
            draw.text((x, y + tile + 14), _clip(str(it.get("class_name", it.get("label"))), chars),
                      fill=(0, 0, 0), font=small)
            x += tile + pad
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _tile(canvas, draw, img, x: int, y: int, colour: tuple[int, int, int], border: int) -> None:
    draw.rectangle([x, y, x + THUMB + 2 * border - 1, y + THUMB + 2 * border - 1], fill=colour)
    canvas.paste(img, (x + border, y + border))


def _write_gallery_html(examples: list[dict[str, Any]], path: Path, title: str,
                        thumbs: _Thumbs) -> None:
    esc = html.escape
    hit = "#{:02x}{:02x}{:02x}".format(*HIT_COLOUR)
    miss = "#{:02x}{:02x}{:02x}".format(*MISS_COLOUR)
    query = "#{:02x}{:02x}{:02x}".format(*QUERY_COLOUR)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)} — retrieval gallery</title>",
        "<style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
        # a query and its results stay on one row (scrolled sideways where the window is
        # narrower): a result wrapped under the query reads as the next query's
        ".row{display:flex;gap:8px;align-items:flex-start;margin:0 0 1.2em 0;flex-wrap:nowrap;"
        "overflow-x:auto;padding-bottom:4px}",
        f"figure{{margin:0;width:{THUMB + 8}px;flex:none;font-size:11px;text-align:center}}",
        f"figure img{{border:4px solid;display:block;width:{THUMB}px;height:{THUMB}px}}",
        f".hit img{{border-color:{hit}}} .miss img{{border-color:{miss}}}",
        f".query img{{border-color:{query}}} .query{{margin-right:16px}}",
        f".hit .r{{color:{hit}}} .miss .r{{color:{miss}}} .query .r{{color:{query}}}",
        "figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p>Each row: a query (blue), then its top results ranked by score; '
        f'<span style="color:{hit}">green = same class (hit)</span>, '
        f'<span style="color:{miss}">red = other class (miss)</span>. '
        "R is the number of relevant gallery images.</p>",
    ]
    current = None
    for ex in examples:
        if ex.get("pair") != current:
            current = ex.get("pair")
            parts.append(f"<h2>{esc(str(current))}</h2>")
        qname = str(ex.get("query_class_name", ex.get("query_label", "")))
        parts.append('<div class="row">')
        parts.append(
            f'<figure class="query" title="{esc(str(ex.get("query_path", "")))}">'
            f'<img src="{thumbs.data_uri(ex.get("query_path"))}" alt="query">'
            f'<figcaption class="r">query · R = {esc(str(ex.get("n_relevant", "")))}</figcaption>'
            f"<figcaption>{esc(qname)}</figcaption>"
            f"<figcaption>{esc(str(ex.get('query_id', ex.get('query_row', ''))))}</figcaption>"
            "</figure>")
        for it in ex.get("results", []):
            cls = "hit" if it.get("hit") else "miss"
            name = str(it.get("class_name", it.get("label", "")))
            parts.append(
                f'<figure class="{cls}" title="{esc(str(it.get("path", "")))}">'
                f'<img src="{thumbs.data_uri(it.get("path"))}" alt="{cls}">'
                f'<figcaption class="r">#{it.get("rank")} · {float(it.get("score", 0)):.3f}'
                f"</figcaption><figcaption>{esc(name)}</figcaption>"
                f"<figcaption>{esc(str(it.get('id', it.get('row', ''))))}</figcaption>"
                "</figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    write_text(path, "\n".join(parts))
