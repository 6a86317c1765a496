"""DICOM whole-slide images: one series = one slide.

A DICOM WSI (VL Whole Slide Microscopy Image IOD) is a *series* of files: one or more per pyramid level
(``ImageType`` value 3 ``VOLUME``) plus associated images (``LABEL``, ``OVERVIEW``, ``THUMBNAIL``). Files
of one series share a ``SeriesInstanceUID``; a series usually lives in a folder of its own (as downloaded
from the Imaging Data Commons), but files of several series can share a folder.

This module groups ``.dcm`` files by series from their headers only (pydicom, ``stop_before_pixels``), so
a cohort of DICOM slides is discovered without decoding pixels, and writes small tiled series (used by
the tests and usable to turn any RGB pyramid into a DICOM WSI). Pixels are read by OpenSlide (4.0+),
which opens a whole series from any one of its files; tiffslide does not read DICOM.

Slide ids (see :func:`pipeline.slide.discover_cohort`): a folder holding exactly one WSI series (below
the slides folder) is the slide, and its name is the slide id; where several series share a folder
(or the files lie directly in the slides folder), each series is a slide of its own and its id is the
series' own ``ContainerIdentifier`` (the slide's identifier in DICOM), else the common beginning of its
file names (``boxes_0.dcm``, ``boxes_1.dcm`` -> ``boxes``), else its ``SeriesInstanceUID`` (each only when
no other series of the folder has the same).
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

#: SOP Class UID of the VL Whole Slide Microscopy Image IOD.
WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: ``ImageType`` values that mark associated images (never processed as slides).
ASSOCIATED_TYPES = ("LABEL", "OVERVIEW", "THUMBNAIL")
_HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "ContainerIdentifier", "SeriesDescription",
                "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Columns", "Rows"]


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A ``.dcm`` file, or a folder that holds ``.dcm`` files directly."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    if p.is_dir():
        return any(c.suffix.lower() == ".dcm" and c.is_file() for c in p.iterdir())
    return False


@dataclass
class DicomHeader:
    path: Path
    sop_class: str
    series_uid: str
    image_type: tuple[str, ...]
    container_id: str
    description: str
    width: int
    height: int

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == WSM_SOP_CLASS

    @property
    def associated(self) -> str | None:
        """``label``/``overview``/``thumbnail`` for an associated image, None for a pyramid level."""
        for t in ASSOCIATED_TYPES:
            if t in self.image_type:
                return t.lower()
        return None


def read_header(path: str | os.PathLike) -> DicomHeader:
    """The few header fields discovery needs (no pixel data is read). Raises ``ValueError`` naming the
    file when it is not a readable DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{p}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc

    def text(name: str) -> str:
        v = ds.get(name)
        return "" if v is None else str(v).strip()

    itype = ds.get("ImageType") or ()
    itype = (str(itype),) if isinstance(itype, str) else tuple(str(v).strip().upper() for v in itype)

    def integer(name: str) -> int:
        try:
            return int(ds.get(name) or 0)
        except (TypeError, ValueError):
            return 0

    return DicomHeader(path=p, sop_class=text("SOPClassUID"), series_uid=text("SeriesInstanceUID"),
                       image_type=itype, container_id=text("ContainerIdentifier"),
                       description=text("SeriesDescription"),
                       width=integer("TotalPixelMatrixColumns") or integer("Columns"),
                       height=integer("TotalPixelMatrixRows") or integer("Rows"))


@dataclass
class DicomSeries:
    """The files of one WSI series in one folder."""

    uid: str
    folder: Path
    levels: list[DicomHeader] = field(default_factory=list)  # VOLUME images, largest first
    associated: list[DicomHeader] = field(default_factory=list)

    @property
    def main(self) -> Path:
        """The file OpenSlide opens the series from (its largest pyramid level)."""
        return self.levels[0].path

    @property
    def container_id(self) -> str:
        return next((h.container_id for h in self.levels + self.associated if h.container_id), "")

    @property
    def files(self) -> list[Path]:
        return sorted(h.path for h in self.levels + self.associated)


def _safe_id(text: str) -> str:
    """An id usable as a file name and a Snakemake wildcard value."""
    out = "".join("_" if (c in "/\\{}<>:" or ord(c) < 32) else c for c in text.strip())
    return unicodedata.normalize("NFC", out.strip(" ."))


@dataclass
class DicomScan:
    """Result of scanning the ``.dcm`` files of one folder."""

    folder: Path
    series: list[DicomSeries]
    #: files that are DICOM but not WSI, WSI series without a pyramid level, unreadable files: (path, why)
    skipped: list[tuple[Path, str]]
    #: files that could not be read as DICOM at all (handed on as slides so they fail clearly per slide)
    unreadable: list[tuple[Path, str]]

    def series_ids(self) -> dict[str, DicomSeries]:
        """id -> series for a folder whose series are slides of their own (see the module docstring)."""
        def unique(key) -> dict[int, str]:
            vals = [key(s) for s in self.series]
            return {i: v for i, v in enumerate(vals) if v and vals.count(v) == 1}

        cids = unique(lambda s: s.container_id)
        prefixes = unique(lambda s: _common_stem(s.files))
        out: dict[str, DicomSeries] = {}
        for i, s in enumerate(self.series):
            out[_safe_id(cids.get(i) or prefixes.get(i) or s.uid)] = s
        return out

    def series_of(self, path: str | os.PathLike) -> DicomSeries | None:
        p = Path(path)
        return next((s for s in self.series if any(f.name == p.name for f in s.files)), None)


def _common_stem(files: list[Path]) -> str:
    """The common beginning of the file names of a series (``boxes_0.dcm``, ``boxes_1.dcm`` -> ``boxes``)."""
    stems = [f.name[:-4] if f.name.lower().endswith(".dcm") else f.stem for f in files]
    if len(stems) == 1:
        return stems[0]
    prefix = os.path.commonprefix(stems)
    return prefix.rstrip(" _-.")


def scan_folder(folder: str | os.PathLike, files: Iterable[Path] | None = None) -> DicomScan:
    """Group the ``.dcm`` files of ``folder`` (or the given ones) into WSI series from their headers."""
    folder = Path(folder)
    if files is None:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"
                 and not p.name.startswith(".")]
    groups: dict[str, DicomSeries] = {}
    skipped: list[tuple[Path, str]] = []
    unreadable: list[tuple[Path, str]] = []
    for p in sorted(files):
        try:
            h = read_header(p)
        except ValueError as exc:
            unreadable.append((p, str(exc)))
            continue
        if not h.is_wsi:
            skipped.append((p, f"DICOM but not a whole-slide image (SOP class {h.sop_class or 'missing'})"))
            continue
        if not h.series_uid:
            unreadable.append((p, f"{p}: DICOM WSI file without a SeriesInstanceUID"))
            continue
        s = groups.setdefault(h.series_uid, DicomSeries(uid=h.series_uid, folder=folder))
        (s.associated if h.associated else s.levels).append(h)
    series = []
    for s in groups.values():
        if not s.levels:
            kinds = ", ".join(sorted({h.associated or "?" for h in s.associated}))
            skipped.extend((h.path, f"associated image ({kinds}) of series {s.uid}, which has no pyramid "
                                    "level (VOLUME image) here") for h in s.associated)
            continue
        s.levels.sort(key=lambda h: (-h.width * h.height, str(h.path)))
        series.append(s)
    series.sort(key=lambda s: str(s.main))
    return DicomScan(folder=folder, series=series, skipped=skipped, unreadable=unreadable)


def series_main_file(folder: str | os.PathLike) -> Path:
    """The file to open for a folder that holds one WSI series; a clear error otherwise."""
    from .slide import SlideError

    scan = scan_folder(folder)
    if len(scan.series) == 1:
        return scan.series[0].main
    if not scan.series:
        why = "; ".join(r for _, r in (scan.unreadable + scan.skipped)[:3])
        raise SlideError(folder, "folder holds no DICOM whole-slide image series"
                                 + (f" ({why})" if why else ""))
    ids = ", ".join(sorted(scan.series_ids()))
    raise SlideError(folder, f"folder holds {len(scan.series)} DICOM series ({ids}): open one of their files "
                             "instead (discovery lists each series as a slide of its own)")


def slide_id_for_file(path: str | os.PathLike) -> str:
    """Slide id of one ``.dcm`` file (the series it belongs to, named as discovery names the series of a
    folder they share); the file name when it is not a readable DICOM WSI file."""
    p = Path(path)
    scan = scan_folder(p.parent)
    for sid, series in scan.series_ids().items():
        if any(f.name == p.name for f in series.files):
            return sid
    return unicodedata.normalize("NFC", p.name[:-4] if p.name.lower().endswith(".dcm") else p.stem)


# -------------------------------------------------------------------------------------------------
# writing a tiled series (tests, conversions)
# -------------------------------------------------------------------------------------------------
def _jpeg(tile) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", tile[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _image_dataset(common: dict[str, Any], image_type: list[str], rgb, mpp: float, tile: int,
                   instance: int):
    """One VL WSM instance (TILED_FULL, JPEG baseline tiles) for an RGB uint8 image at ``mpp`` µm/px."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID, generate_uid

    h, w = rgb.shape[:2]
    th, tw = min(tile, h), min(tile, w)
    frames = []
    for y in range(0, h, th):
        for x in range(0, w, tw):
            block = np.full((th, tw, 3), 255, np.uint8)
            part = rgb[y:y + th, x:x + tw]
            block[:part.shape[0], :part.shape[1]] = part
            frames.append(_jpeg(block))
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSM_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    for k, v in common.items():
        setattr(ds, k, v)
    ds.SOPClassUID = WSM_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImageType = image_type
    ds.Rows, ds.Columns = th, tw
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.BurnedInAnnotation = "YES" if "LABEL" in image_type else "NO"
    ds.SpecimenLabelInImage = "YES" if "LABEL" in image_type else "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImagedVolumeWidth = round(w * mpp / 1000.0, 6)  # mm
    ds.ImagedVolumeHeight = round(h * mpp / 1000.0, 6)
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    pm = Dataset()
    pm.PixelSpacing = [round(mpp / 1000.0, 9), round(mpp / 1000.0, 9)]  # mm (row, column spacing)
    pm.SliceThickness = 0.001
    ftype = Dataset()
    ftype.FrameType = image_type
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([ftype])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    op = Dataset()
    op.OpticalPathIdentifier = "1"
    color = Dataset()
    color.CodeValue, color.CodingSchemeDesignator, color.CodeMeaning = "11744", "DCM", "Brightfield illumination"
    op.IlluminationTypeCodeSequence = Sequence([color])
    white = Dataset()
    white.CodeValue, white.CodingSchemeDesignator, white.CodeMeaning = "414298005", "SCT", "Full Spectrum"
    op.IlluminationColorCodeSequence = Sequence([white])
    ds.OpticalPathSequence = Sequence([op])
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def write_series(out_dir: str | os.PathLike, levels: list, mpp: float, label=None, tile: int = 256,
                 container_id: str = "SLIDE-1", description: str = "", file_prefix: str = "level",
                 series_uid: str | None = None) -> list[Path]:
    """Write a tiled DICOM WSI series: one file per pyramid level (``levels``: RGB uint8 arrays, largest
    first, ``mpp`` = µm/px of the first) and, when given, a label image. Returns the files written."""
    import datetime as _dt

    from pydicom.uid import generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now()
    common = {
        "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": series_uid or generate_uid(),
        "FrameOfReferenceUID": generate_uid(), "Modality": "SM", "PatientName": "Synthetic^Slide",
        "PatientID": container_id, "StudyID": "1", "AccessionNumber": "", "ReferringPhysicianName": "",
        "PatientBirthDate": "", "PatientSex": "", "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"), "ContentDate": now.strftime("%Y%m%d"),
        "ContentTime": now.strftime("%H%M%S"), "SeriesNumber": 1, "ContainerIdentifier": container_id,
        "SeriesDescription": description, "Manufacturer": "wsipipe", "ManufacturerModelName": "synthetic",
        "DeviceSerialNumber": "0", "SoftwareVersions": "wsipipe", "PositionReferenceIndicator": "SLIDE_CORNER",
        "AcquisitionDateTime": now.strftime("%Y%m%d%H%M%S"),
    }
    paths = []
    w0 = levels[0].shape[1]
    for i, rgb in enumerate(levels):
        itype = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds = _image_dataset(common, itype, rgb, mpp * w0 / rgb.shape[1], tile, i + 1)
        p = out / f"{file_prefix}_{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    if label is not None:
        ds = _image_dataset(common, ["ORIGINAL", "PRIMARY", "LABEL", "NONE"], label, 20.0,
                            max(label.shape[:2]), len(levels) + 1)
        p = out / f"{file_prefix}_label.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
