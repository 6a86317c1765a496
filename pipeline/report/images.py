"""Images embedded in the QC report: the slide overview (thumbnail + patch grid) as a data URI, and the
coordinates of ROC curves in an SVG plot (the markup itself is in the template)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

#: Longest side of the overview image embedded per slide (pixels).
IMAGE_MAX_PX = 512
#: Above this many bytes as PNG, an overview is embedded as JPEG instead.
PNG_MAX_BYTES = 60_000
JPEG_QUALITY = 80
_GRID_BGR = (255, 90, 0)  # patch rectangles: blue-ish (OpenCV BGR order)
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def data_uri(img_bgr: np.ndarray) -> str | None:
    """PNG (or JPEG when the PNG would be large) data URI of a BGR image."""
    import cv2

    ok, buf = cv2.imencode(".png", img_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    mime = "image/png"
    if not ok or len(buf) > PNG_MAX_BYTES:
        ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        mime = "image/jpeg"
    if not ok:
        return None
    return f"data:{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def _fit(img: np.ndarray, max_px: int) -> np.ndarray:
    import cv2

    th, tw = img.shape[:2]
    scale = min(1.0, max_px / max(th, tw))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(tw * scale)), max(1, round(th * scale))), interpolation=cv2.INTER_AREA)
    return img


def image_uri(path: str | Path, max_px: int = IMAGE_MAX_PX) -> str | None:
    """Data URI of an image file (a heatmap) scaled to ``max_px``; None when it cannot be read."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if img is None else data_uri(_fit(img, max_px))


def overview_image(rec: dict[str, Any], max_px: int = IMAGE_MAX_PX) -> str | None:
    """Data URI of the tissue thumbnail with the patch grid drawn on it; None without a thumbnail."""
    import cv2

    path = rec.get("thumbnail")
    if path is None or not Path(path).is_file():
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        rec["problems"].append("unreadable thumbnail.png")
        return None
    img = _fit(img, max_px)
    h, w = img.shape[:2]
    grid, dims = rec.get("grid"), rec.get("dimensions")
    try:
        coords = np.asarray((grid or {}).get("coords") or [], dtype=np.float64).reshape(-1, 2)
        size0 = float(((grid or {}).get("read_plan") or {}).get("patch_size_level0_px") or 0)
        if coords.size and size0 > 0 and dims and dims[0] > 0 and dims[1] > 0:
            sx, sy = w / float(dims[0]), h / float(dims[1])
            x0 = np.round(coords[:, 0] * sx).astype(np.int64)
            y0 = np.round(coords[:, 1] * sy).astype(np.int64)
            x1 = np.round((coords[:, 0] + size0) * sx).astype(np.int64) - 1
            y1 = np.round((coords[:, 1] + size0) * sy).astype(np.int64) - 1
            overlay = img.copy()
            if size0 * sx < 3:  # patches too small to outline: shade them
                for a, b, c, d in zip(x0, y0, np.maximum(x1, x0), np.maximum(y1, y0)):
                    cv2.rectangle(overlay, (int(a), int(b)), (int(c), int(d)), _GRID_BGR, thickness=-1)
                img = cv2.addWeighted(overlay, 0.35, img, 0.65, 0)
            else:
                for a, b, c, d in zip(x0, y0, x1, y1):
                    cv2.rectangle(overlay, (int(a), int(b)), (int(c), int(d)), _GRID_BGR, thickness=1)
                img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    except (TypeError, ValueError) as exc:
        rec["problems"].append(f"cannot draw the patch grid ({exc})")
    return data_uri(img)


def roc_plot(curves: list[dict[str, Any]], size: int = 320) -> dict[str, Any]:
    """Geometry of an ROC plot for the template's ``roc_svg`` macro: plot box, gridlines, ticks and one
    ``points`` string per curve (with its colour, name and AUC)."""
    m = 40  # margin for the axes labels
    p = size - m - 10  # plot side

    def xy(fx: float, ty: float) -> str:
        return f"{m + fx * p:.1f},{10 + (1 - ty) * p:.1f}"

    return {
        "size": size, "height": size + 16 * len(curves) + 8, "m": m, "p": p,
        "grid": [m + t * p for t in (0.25, 0.5, 0.75)], "grid_y": [10 + t * p for t in (0.25, 0.5, 0.75)],
        "ticks": [(t, m + t * p, 10 + (1 - t) * p) for t in (0.0, 0.5, 1.0)],
        "curves": [{"name": c["name"], "auc": c["auc"], "colour": CURVE_COLOURS[i % len(CURVE_COLOURS)],
                    "points": " ".join(xy(f, t) for f, t in zip(c["fpr"], c["tpr"])), "legend_y": size + 4 + 16 * i}
                   for i, c in enumerate(curves)],
    }


def km_plot(km: dict[str, Any], size: int = 320) -> dict[str, Any]:
    """Geometry of a Kaplan-Meier plot for the template's ``km_svg`` macro: one step ``points`` string per
    risk group (time scaled to the longest follow-up), with its colour and the log-rank p-value."""
    m, p = 40, size - 50
    t_max = max([max(g["time"] + g["censored"] or [0.0]) for g in km["groups"]] + [1e-9])

    def xy(t: float, s: float) -> str:
        return f"{m + t / t_max * p:.1f},{10 + (1 - s) * p:.1f}"

    groups = []
    for i, g in enumerate(km["groups"]):
        pts, last = [], 1.0
        for t, s in zip(g["time"], g["survival"]):
            pts += [xy(t, last), xy(t, s)]
            last = s
        end = max(g["time"] + g["censored"] or [0.0])
        pts.append(xy(end, last))
        groups.append({"name": f"{g['name']} (n={g['n']}, {g['events']} events)", "points": " ".join(pts),
                       "colour": CURVE_COLOURS[i % len(CURVE_COLOURS)], "legend_y": size + 4 + 16 * i})
    lr = km.get("logrank") or {}
    return {"size": size, "height": size + 16 * len(groups) + 24, "m": m, "p": p, "t_max": t_max,
            "groups": groups, "p_value": lr.get("p"), "split": km.get("split"),
            "ticks": [(t, m + t * p, 10 + (1 - t) * p) for t in (0.0, 0.5, 1.0)]}
