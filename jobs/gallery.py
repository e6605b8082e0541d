"""An HTML gallery of captions: each sampled image's thumbnail, every model's caption side by
side, the references and the per-image scores, with a filter for the images where the models
disagree and a sort by score. One self-contained file: thumbnails are inline JPEG data URIs,
the style and the script are inline, so it opens from disk with no server and no network.

Usage from caption rows (one row per image and model, e.g. a caption job's Parquet):

    ids = sample_ids(table.column("image_id").to_pylist(), 200)
    rows = table.filter(pc.is_in(table["image_id"], pa.array(ids))).to_pylist()
    write_gallery(out / "gallery.html", gallery_items(rows, references), title="...")
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place
from capfleet.model.images import MAX_PIXELS, ImageError, open_image

GALLERY_FILE = "gallery.html"
DEFAULT_GALLERY_IMAGES = 200  # a page that loads at once; a sample, never a whole job
MAX_GALLERY_IMAGES = 2000  # beyond this a page of inline thumbnails is too heavy to open
THUMBNAIL_PX = 160  # the longer side of an inline thumbnail

# Per-image score columns, as model.metrics.PER_IMAGE_METRICS names them, and their labels.
SCORE_LABELS = {"cider_d": "CIDEr-D", "rouge_l": "ROUGE-L", "sentence_bleu4": "BLEU-4 (sentence)"}


def check_gallery_size(images: int, name: str = "gallery") -> None:
    """Refuse a gallery size outside 0..MAX_GALLERY_IMAGES (0 = no gallery)."""
    if isinstance(images, bool) or not isinstance(images, int):
        raise CapfleetError(f"{name}: must be a whole number of images, got {images!r}")
    if not 0 <= images <= MAX_GALLERY_IMAGES:
        raise CapfleetError(
            f"{name}: must be 0 (no gallery) to {MAX_GALLERY_IMAGES} images, got {images}"
        )


def _rank(image_id: str) -> bytes:
    return hashlib.sha256(image_id.encode("utf-8")).digest()


def sample_ids(image_ids: Iterable[str], n: int = DEFAULT_GALLERY_IMAGES) -> list[str]:
    """Up to n distinct ids, sorted: those with the smallest sha256. The same ids for the same
    set in any order, and an id kept in a sample stays in it when other ids join or leave
    above it; memory is O(n), so a million-row column streams through."""
    check_gallery_size(n, "gallery images")
    picked = heapq.nsmallest(n, {str(i) for i in image_ids}, key=_rank)
    return sorted(picked)


def thumbnail(
    source: bytes | str | Path | None, size: int = THUMBNAIL_PX
) -> tuple[str | None, str]:
    """(a data:image/jpeg;base64 URI, "") for image bytes, a path or a URI (read through
    pyarrow's filesystems), or (None, the reason) where there is no image to show."""
    if source is None:
        return None, "no image"
    if isinstance(source, (str, Path)):
        from capfleet.jobs.caption.fetch import read_uri

        data = read_uri(str(source))
        if not isinstance(data, bytes):
            return None, str(data)
    else:
        data = bytes(source)
    small = thumbnail_jpeg(data, size)
    if isinstance(small, str):
        return None, small
    return "data:image/jpeg;base64," + base64.b64encode(small).decode("ascii"), ""


def thumbnail_jpeg(data: bytes, size: int = THUMBNAIL_PX) -> bytes | str:
    """A small JPEG of image bytes (the longer side `size`), or why there is none."""

    opened = open_image(data)  # the formats captioning decodes, and no others
    if isinstance(opened, ImageError):
        return f"not shown: {opened.reason}"
    try:
        with opened as img:
            if img.width * img.height > MAX_PIXELS:  # opening reads only the header
                return f"too large: {img.width}x{img.height}"
            img.draft("RGB", (size, size))  # JPEG: decode at a fraction of full size
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception as e:  # noqa: BLE001  a bad image becomes a placeholder, not a failed page
        return f"not shown: {type(e).__name__}"
    return buf.getvalue()


def gallery_items(
    rows: Iterable[Mapping],
    references: Mapping[str, Sequence[str]] | None = None,
    images: Mapping[str, bytes | str] | None = None,
) -> list[dict]:
    """Caption rows -> gallery items, one per image, sorted by image id.

    Each row is one (image, model): `image_id`, `model`, `caption`, `status`, `error`, and
    optionally `uri` (the thumbnail's source), `references` (a list) and per-image score
    columns (SCORE_LABELS' names; others are ignored). `references` ({image_id: captions})
    and `images` ({image_id: bytes or path}) override what the rows carry."""
    items: dict[str, dict] = {}
    for row in rows:
        try:
            image_id, model = str(row["image_id"]), str(row["model"])
        except KeyError as e:
            raise CapfleetError(f"caption row without {e.args[0]!r}: {dict(row)!r}") from e
        item = items.setdefault(
            image_id,
            {"image_id": image_id, "image": row.get("uri"), "references": [], "captions": {}},
        )
        if row.get("references") and not item["references"]:
            item["references"] = list(row["references"])
        if model in item["captions"]:
            raise CapfleetError(f"two caption rows for image {image_id!r} and model {model!r}")
        item["captions"][model] = {
            "caption": row.get("caption"),
            "status": row.get("status") or ("ok" if row.get("caption") is not None else "error"),
            "error": row.get("error"),
            "scores": {k: row[k] for k in SCORE_LABELS if row.get(k) is not None},
        }
    for image_id, item in items.items():
        if references is not None and image_id in references:
            item["references"] = list(references[image_id])
        if images is not None and image_id in images:
            item["image"] = images[image_id]
    return [items[k] for k in sorted(items)]


def _models(items: Sequence[dict], models: Sequence[str] | None) -> list[str]:
    if models is None:
        return list(dict.fromkeys(m for it in items for m in it.get("captions", {})))
    models = [str(m) for m in models]
    if len(set(models)) != len(models):
        raise CapfleetError(f"gallery: a model is named twice in {models}")
    return models


def _disagree(captions: Sequence[str]) -> bool:
    """The models that captioned the image wrote more than one distinct caption."""
    return len(set(captions)) > 1


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#222;
background:#fff}
h1{font-size:20px;margin:0 0 4px}
p.note{color:#555;margin:0 0 10px;max-width:70em}
#controls{position:sticky;top:0;background:#f4f6f8;padding:8px;border:1px solid #d8dde3;
display:flex;gap:16px;flex-wrap:wrap;align-items:center;z-index:1}
table{border-collapse:collapse;margin-top:8px;width:100%}
th,td{border:1px solid #d8dde3;padding:6px 8px;vertical-align:top;text-align:left}
th{background:#eef1f4;position:sticky;top:42px}
td.img{width:170px}
td.img img{display:block;max-width:160px;max-height:160px;border-radius:3px}
td.img .missing{width:160px;height:90px;background:#eee;color:#777;display:flex;
align-items:center;justify-content:center;font-size:12px;text-align:center}
.id{font:12px ui-monospace,monospace;color:#555;word-break:break-all;margin-top:4px}
td.refs ol{margin:0;padding-left:18px;color:#444}
td.cap .caption{font-size:15px}
td.cap.differs .caption{background:#fff3c4}
td.cap .scores{font:12px ui-monospace,monospace;color:#555;margin-top:4px}
td.cap.error{background:#fdecec}
td.cap.error .err{color:#a11}
td.cap.none{color:#999}
tr.item[hidden]{display:none}
"""

# Filter and sort in place; the state lives in the address's #fragment (disagree=1,
# sort=METRIC.MODEL_INDEX or METRIC.mean, order=asc|desc) so a view can be linked to.
_SCRIPT = """
(function () {
  var body = document.querySelector("#gallery tbody");
  var rows = Array.prototype.slice.call(body.rows);
  var scores = new Map(rows.map(function (r) { return [r, JSON.parse(r.dataset.scores)]; }));
  var dis = document.getElementById("disagree");
  var sort = document.getElementById("sort");
  var order = document.getElementById("order");
  var count = document.getElementById("count");
  var params = new URLSearchParams(location.hash.slice(1));
  dis.checked = params.get("disagree") === "1";
  var wanted = params.get("sort");
  if (Array.prototype.some.call(sort.options, function (o) { return o.value === wanted; }))
    sort.value = wanted;
  if (params.get("order") === "desc" || params.get("order") === "asc")
    order.value = params.get("order");
  function apply(save) {
    var key = sort.value, desc = order.value === "desc";
    var sorted = rows.slice();
    if (key !== "id") {
      sorted.sort(function (a, b) {
        var x = scores.get(a)[key], y = scores.get(b)[key];
        var nx = x === undefined || x === null, ny = y === undefined || y === null;
        if (nx || ny) return nx === ny ? 0 : nx ? 1 : -1;
        return desc ? y - x : x - y;
      });
    } else if (desc) {
      sorted.reverse();
    }
    var shown = 0;
    sorted.forEach(function (r) {
      var hide = dis.checked && r.dataset.disagree !== "1";
      r.hidden = hide;
      if (!hide) shown += 1;
      body.appendChild(r);
    });
    count.textContent = shown + " of " + rows.length + " images shown";
    if (save) {
      var state = "disagree=" + (dis.checked ? 1 : 0) + "&sort=" + key + "&order=" + order.value;
      try { history.replaceState(null, "", "#" + state); } catch (e) { /* file:// may refuse */ }
    }
  }
  [dis, sort, order].forEach(function (el) {
    el.addEventListener("change", function () { apply(true); });
  });
  apply(false);
})();
"""


def render_gallery(
    items: Sequence[dict], models: Sequence[str] | None = None, title: str = "capfleet captions"
) -> str:
    """The gallery page as HTML text (see write_gallery)."""
    if len(items) > MAX_GALLERY_IMAGES:
        raise CapfleetError(
            f"gallery: {len(items)} images, at most {MAX_GALLERY_IMAGES} (pick some with "
            "sample_ids)"
        )
    models = _models(items, models)
    keys = [
        k
        for k in SCORE_LABELS
        if any(k in c.get("scores", {}) for it in items for c in it["captions"].values())
    ]
    e = html.escape
    options = ['<option value="id">image id</option>']
    for k in keys:
        options.append(f'<option value="{k}.mean">{e(SCORE_LABELS[k])}, mean over models</option>')
        options += [
            f'<option value="{k}.{i}">{e(SCORE_LABELS[k])} of {e(m)}</option>'
            for i, m in enumerate(models)
        ]
    head = "".join(f"<th>{e(m)}</th>" for m in models)
    body, disagreeing = [], 0
    for it in items:
        if "image_id" not in it:
            raise CapfleetError(f"gallery item without an image_id: {sorted(it)}")
        caps = it.get("captions", {})
        ok = [caps[m]["caption"] for m in models if m in caps and caps[m].get("status") == "ok"]
        common = Counter(ok).most_common(1)[0][0] if ok else None
        disagree = _disagree(ok)
        disagreeing += disagree
        row_scores: dict[str, float] = {}
        cells = []
        for i, m in enumerate(models):
            c = caps.get(m)
            if c is None:
                cells.append('<td class="cap none">not captioned</td>')
                continue
            sc = {k: float(v) for k, v in c.get("scores", {}).items() if v is not None}
            row_scores.update({f"{k}.{i}": v for k, v in sc.items()})
            shown = " · ".join(f"{SCORE_LABELS.get(k, k)} {v:.3f}" for k, v in sc.items())
            if c.get("status") == "ok":
                differs = " differs" if disagree and c["caption"] != common else ""
                cells.append(
                    f'<td class="cap ok{differs}" data-model="{e(m)}">'
                    f'<div class="caption">{e(str(c["caption"]))}</div>'
                    f'<div class="scores">{e(shown)}</div></td>'
                )
            else:
                cells.append(
                    f'<td class="cap error" data-model="{e(m)}">'
                    f'<div class="err">error: {e(str(c.get("error") or "unknown"))}</div></td>'
                )
        for k in keys:
            vals = [row_scores[f"{k}.{i}"] for i in range(len(models)) if f"{k}.{i}" in row_scores]
            if vals:
                row_scores[f"{k}.mean"] = sum(vals) / len(vals)
        uri, why = thumbnail(it.get("image"))
        short = why if len(why) <= 60 else why[:57] + "..."
        img = (
            f'<img src="{uri}" alt="{e(it["image_id"])}">'
            if uri
            else f'<div class="missing" title="{e(why)}">{e(short)}</div>'
        )
        refs = "".join(f"<li>{e(str(r))}</li>" for r in it.get("references") or [])
        body.append(
            f'<tr class="item" data-id="{e(it["image_id"])}" data-disagree="{int(disagree)}" '
            f"data-scores='{e(json.dumps(row_scores), quote=True)}'>"
            f'<td class="img">{img}<div class="id">{e(it["image_id"])}</div></td>'
            f'<td class="refs">{"<ol>" + refs + "</ol>" if refs else "no references"}</td>'
            + "".join(cells)
            + "</tr>"
        )
    note = (
        f"{len(items)} images, {len(models)} models; the models that captioned an image "
        f"disagree on {disagreeing} of them (highlighted: captions that differ from the most "
        "common one). Per-image scores against the references shown; CIDEr-D's IDF comes from all "
        "the images scored together, so it compares only within one image set."
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{e(title)}</h1><p class="note">{e(note)}</p>'
        '<div id="controls"><label><input type="checkbox" id="disagree"> only images where '
        "the models disagree</label>"
        f'<label>sort by <select id="sort">{"".join(options)}</select></label>'
        '<select id="order" aria-label="order"><option value="asc">lowest first</option>'
        '<option value="desc">highest first</option></select>'
        '<span id="count"></span></div>'
        f'<table id="gallery"><thead><tr><th>image</th><th>references</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_gallery(
    path: str | Path,
    items: Sequence[dict],
    models: Sequence[str] | None = None,
    title: str = "capfleet captions",
) -> Path:
    """Write the gallery page atomically; returns its path.

    items: one dict per image, as `gallery_items` makes them: `image_id`, `image` (bytes, a
    path or a URI; None for no thumbnail), `references` (list of str) and `captions`
    ({model: {"caption", "status" ("ok"/"error"), "error", "scores": {name: float}}}).
    models: the columns, in order (default: every model of the items, as first seen).
    At most MAX_GALLERY_IMAGES items: sample a large job with `sample_ids` first."""
    path = place(path)
    write_bytes_atomic(path, render_gallery(items, models, title).encode("utf-8"))
    return path
