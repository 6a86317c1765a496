"""Cohorts as users have them: DICOM WSI series, MIRAX and VMS companions, slide-list CSVs, nested trees,
labels that do not match the slides."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from pipeline.dicom import scan_folder, write_series
from pipeline.slide import (Cohort, SlideError, discover_cohort, discover_slides, format_reconcile, open_slide,
                            read_manifest, reconcile, slide_files, slide_id_from_path)
from pipeline.synthetic import make_slide

MPP = 0.5


@pytest.fixture(scope="module")
def synthetic_levels(tmp_path_factory):
    """Level 0 and a 4x smaller level of a synthetic slide (RGB arrays), and its path."""
    d = tmp_path_factory.mktemp("dcmsrc")
    path = make_slide(d / "src.tif", width=2048, height=1536, mpp=MPP, seed=3, positive=True)["path"]
    with open_slide(path) as s:
        l0 = s.read_region(0, 0, 0, *s.dimensions)
        l1 = s.read_level(s.best_level_for_downsample(4.0))
    return l0, l1, path


def _dicom_slide(folder: Path, levels, container_id="CASE-1", prefix="level", label=True):
    lab = np.full((80, 200, 3), 230, np.uint8)
    lab[20:60, 20:180] = 20  # a "barcode"
    return write_series(folder, list(levels), MPP, label=lab if label else None, tile=256,
                        container_id=container_id, file_prefix=prefix)


# -------------------------------------------------------------------------------------------------
# DICOM
# -------------------------------------------------------------------------------------------------
def test_dicom_series_is_one_slide_named_after_its_folder(synthetic_levels, tmp_path):
    l0, l1, _ = synthetic_levels
    root = tmp_path / "slides"
    files = _dicom_slide(root / "patient 7 é", (l0, l1))
    assert len(files) == 3  # two pyramid levels in two files + a label image
    make_slide(root / "plain.svs", width=512, height=384, mpp=MPP, seed=1)
    found = discover_cohort(slides_dir=root)
    assert sorted(found) == ["patient 7 é", "plain"]
    assert found["patient 7 é"] == root / "patient 7 é"
    assert any("label image" in n for n in found.notes)
    assert slide_id_from_path(found["patient 7 é"]) == "patient 7 é"
    assert sorted(slide_files(found["patient 7 é"])) == sorted(files)
    # the folder opens as one slide through OpenSlide, with the pixel spacing as µm/px
    with open_slide(found["patient 7 é"]) as s:
        assert s.reader == "openslide" and s.vendor == "dicom"
        assert s.mpp == pytest.approx(MPP) and s.mpp_source == "openslide.mpp-x"
        assert s.dimensions == (l0.shape[1], l0.shape[0]) and s.level_count == 2
        assert s.slide_id == "patient 7 é"
        a = s.read_region(600, 500, 0, 64, 64).astype(int)
        assert np.abs(a - l0[500:564, 600:664]).mean() < 6  # JPEG tiles: close, not identical
    # any one file of the series opens the whole series
    with open_slide(files[1]) as s:
        assert s.level_count == 2 and s.dimensions == (l0.shape[1], l0.shape[0])


def test_dicom_needs_openslide(synthetic_levels, tmp_path):
    l0, l1, _ = synthetic_levels
    _dicom_slide(tmp_path / "d", (l1,), label=False)
    with pytest.raises(SlideError, match="tiffslide does not read DICOM"):
        open_slide(tmp_path / "d", reader="tiffslide")


def test_two_series_in_one_folder_are_two_slides(synthetic_levels, tmp_path):
    l0, l1, _ = synthetic_levels
    root = tmp_path / "flat"
    _dicom_slide(root, (l1, l1[::2, ::2]), container_id="A-1", prefix="a")
    _dicom_slide(root, (l1[::2, ::2],), container_id="B-2", prefix="b")
    (root / "notes.dcm").write_bytes(b"not dicom at all")
    found = discover_cohort(slides_dir=root)
    # each series is a slide named by its ContainerIdentifier; the unreadable file is handed on (it fails
    # clearly in its first stage); the label images are not slides
    assert sorted(found) == ["A-1", "B-2", "notes"]
    assert found["A-1"].name == "a_0.dcm" and found["B-2"].name == "b_0.dcm"
    assert slide_id_from_path(root / "a_1.dcm") == "A-1"  # any file of the series names the series
    with pytest.raises(SlideError, match="not a slide file|cannot open"):
        open_slide(found["notes"])
    # the folder itself, given as a slide, is refused with the series it holds
    with pytest.raises(SlideError, match="2 DICOM series .*A-1, B-2"):
        open_slide(root)
    # same ContainerIdentifier twice: the file-name stems tell them apart
    root2 = tmp_path / "flat2"
    _dicom_slide(root2, (l1[::2, ::2],), container_id="SAME", prefix="boxes", label=False)
    _dicom_slide(root2, (l1[::2, ::2],), container_id="SAME", prefix="other", label=False)
    assert sorted(discover_cohort(slides_dir=root2)) == ["boxes_0", "other_0"]


def test_dicom_slide_end_to_end_gives_one_bag(synthetic_levels, tmp_path):
    """tissue -> grid -> features through the stage entry points, on the DICOM folder: one bag."""
    from pipeline.__main__ import main
    from pipeline.store import list_bags, read_bag

    l0, l1, _ = synthetic_levels
    root = tmp_path / "slides"
    _dicom_slide(root / "case1", (l0, l1))
    slides = discover_cohort(slides_dir=root)
    assert list(slides) == ["case1"]
    res = tmp_path / "results"
    path = str(slides["case1"])
    assert main(["tissue", "--slide", path, "--out-dir", str(res / "tissue" / "case1")]) == 0
    assert main(["grid", "--slide", path, "--tissue-dir", str(res / "tissue" / "case1"),
                 "--out", str(res / "grid" / "case1.json"),
                 "--settings", json.dumps({"patch_size": 64, "target_mpp": 2.0})]) == 0
    settings = {"model": "test_resnet", "batch_size": 16, "num_workers": 0, "device": "cpu"}
    assert main(["features", "--slide", path, "--grid", str(res / "grid" / "case1.json"),
                 "--out", str(res / "features" / "case1.zarr"), "--settings", json.dumps(settings),
                 "--threads", "1"]) == 0
    bags = list_bags(res / "features")
    assert [b.name for b in bags] == ["case1.zarr"]
    bag = read_bag(bags[0])
    grid = json.loads((res / "grid" / "case1.json").read_text())
    assert bag.slide_id == "case1" and bag.n == grid["n_patches"] > 0
    assert bag.attrs["level0_mpp"] == pytest.approx(MPP)
    assert bag.attrs["provenance"]["slide"]["vendor"] == "dicom"


def test_non_wsi_dicom_and_orphan_associated_images_are_not_slides(synthetic_levels, tmp_path):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    l0, l1, _ = synthetic_levels
    root = tmp_path / "s"
    # a CT-like DICOM file (not a whole-slide image) in its own folder
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, \
        meta.MediaStorageSOPInstanceUID, generate_uid()
    ds.Modality = "CT"
    (root / "ct").mkdir(parents=True)
    ds.save_as(root / "ct" / "x.dcm", enforce_file_format=True)
    # a label image whose pyramid is not there
    files = _dicom_slide(root / "labelonly", (l1[::4, ::4],))
    for f in files[:-1]:
        f.unlink()
    found = discover_cohort(slides_dir=root)
    assert dict(found) == {}
    assert any("not a whole-slide image" in n for n in found.notes)
    assert any("no pyramid level" in n for n in found.notes)
    assert pydicom.dcmread(root / "ct" / "x.dcm").Modality == "CT"


# -------------------------------------------------------------------------------------------------
# MIRAX, VMS/VMU
# -------------------------------------------------------------------------------------------------
def test_mirax_and_vms_companions(tmp_path):
    root = tmp_path / "slides"
    (root / "a").mkdir(parents=True)
    (root / "a.mrxs").write_bytes(b"[GENERAL]\n")
    (root / "a" / "Slidedat.ini").write_text("[GENERAL]\n")
    (root / "a" / "Data0000.dat").write_bytes(b"\0" * 10)
    (root / "a" / "Index.dat").write_bytes(b"\0" * 10)
    (root / "a" / "looks_like.tif").write_bytes(b"x")  # inside a companion folder: never a slide
    (root / "b.mrxs").write_bytes(b"[GENERAL]\n")  # companion folder missing
    (root / "c.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=c.jpg\n"
                                "ImageFile(1,0)=c_1.jpg\nMapFile=c_map.jpg\nOptimisationFile=c.opt\n")
    (root / "c.jpg").write_bytes(b"x")
    (root / "d.vmu").write_text("[Uncompressed Virtual Microscope Specimen]\nImageFile=d.ngr\n")
    (root / "d.ngr").write_bytes(b"x")
    for recursive in (False, True):
        found = discover_cohort(slides_dir=root, recursive=recursive)
        assert sorted(found) == ["a", "b", "c", "d"], recursive
    assert any("b.mrxs" in n and "missing" in n for n in found.notes)
    assert any(n.startswith(str(root / "a")) and "companion" in n for n in found.notes)
    assert slide_files(root / "a.mrxs") == [root / "a.mrxs", root / "a" / "Data0000.dat",
                                            root / "a" / "Index.dat", root / "a" / "Slidedat.ini",
                                            root / "a" / "looks_like.tif"]
    with pytest.raises(SlideError) as exc:
        open_slide(root / "b.mrxs")
    assert str(root / "b") in str(exc.value) and "companion folder" in str(exc.value)
    (root / "b").mkdir()
    with pytest.raises(SlideError, match="no Slidedat.ini"):
        open_slide(root / "b.mrxs")
    with pytest.raises(SlideError) as exc:
        open_slide(root / "c.vms")
    msg = str(exc.value)
    assert "c_1.jpg" in msg and "c_map.jpg" in msg and "c.opt" in msg and "c.jpg," not in msg
    with pytest.raises(SlideError) as exc:  # complete VMU: fails in the reader (fake content), not before
        open_slide(root / "d.vmu")
    assert "missing" not in str(exc.value)


# -------------------------------------------------------------------------------------------------
# slide lists and nested trees
# -------------------------------------------------------------------------------------------------
def test_slide_list_csv(tmp_path):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    (data / "x" / "raw 1.svs").write_bytes(b"1")
    (data / "y.tif").write_bytes(b"1")
    other = tmp_path / "elsewhere.ndpi"
    other.write_bytes(b"1")
    csv = data / "slides.csv"
    csv.write_text("slide_id,path,patient_id,label\n"
                   "s1,x/raw 1.svs,p1,1\n"
                   ",y.tif,p2,0\n"
                   f"s3,{other},p3,1\n"
                   "gone,x/nothere.svs,p4,0\n")
    found = discover_cohort(slides_csv=csv)
    assert isinstance(found, Cohort)
    assert dict(found) == {"s1": data / "x" / "raw 1.svs", "y": data / "y.tif", "s3": other}
    assert found.missing == {"gone": data / "x" / "nothere.svs"}
    assert found.rows["s1"]["patient_id"] == "p1" and found.rows["y"]["label"] == "0"
    csv.write_text("slide_id,path\na,y.tif\na,x/raw 1.svs\n")
    with pytest.raises(SlideError) as exc:
        discover_cohort(slides_csv=csv)
    assert "y.tif" in str(exc.value) and "raw 1.svs" in str(exc.value) and "line 3" in str(exc.value)
    csv.write_text("slide_id,file\na,y.tif\n")
    with pytest.raises(SlideError, match="no 'path' column"):
        discover_cohort(slides_csv=csv)
    with pytest.raises(ValueError, match="either slides_dir or slides_csv"):
        discover_cohort(slides_dir=data, slides_csv=csv)


def test_recursive_tcga_like_tree_and_collisions(tmp_path):
    root = tmp_path / "tcga"
    for project, uuid, name in [("BRCA", "0a1b", "TCGA-A1-0001-01Z-00-DX1.svs"),
                                ("BRCA", "9f8e", "TCGA-A1-0002-01Z-00-DX1.svs"),
                                ("LUAD", "77aa", "TCGA-B2-0003-01Z-00-DX1.svs")]:
        (root / project / uuid).mkdir(parents=True)
        (root / project / uuid / name).write_bytes(b"1")
        (root / project / uuid / "annotations.txt").write_text("x")
    (root / "BRCA" / "0a1b" / "logs").mkdir()
    assert discover_cohort(slides_dir=root) == {}  # not recursive: nothing at the top
    found = discover_cohort(slides_dir=root, recursive=True)
    assert sorted(found) == ["TCGA-A1-0001-01Z-00-DX1", "TCGA-A1-0002-01Z-00-DX1", "TCGA-B2-0003-01Z-00-DX1"]
    assert found["TCGA-B2-0003-01Z-00-DX1"] == root / "LUAD" / "77aa" / "TCGA-B2-0003-01Z-00-DX1.svs"
    assert discover_slides(root, recursive=True) == found
    # the same name in two folders: refused, both paths named
    (root / "LUAD" / "dup").mkdir()
    (root / "LUAD" / "dup" / "TCGA-A1-0001-01Z-00-DX1.svs").write_bytes(b"1")
    with pytest.raises(SlideError) as exc:
        discover_cohort(slides_dir=root, recursive=True)
    assert "0a1b" in str(exc.value) and "dup" in str(exc.value)
    (root / "LUAD" / "dup" / "TCGA-A1-0001-01Z-00-DX1.svs").unlink()
    # the same name in NFC and NFD (e.g. copied from macOS) is the same id: refused, both named
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    (root / "LUAD" / "dup" / f"{nfc}.svs").write_bytes(b"1")
    (root / "BRCA" / f"{nfd}.tif").write_bytes(b"1")
    with pytest.raises(SlideError) as exc:
        discover_cohort(slides_dir=root, recursive=True)
    assert "café.svs" in unicodedata.normalize("NFC", str(exc.value)) and "duplicate slide id" in str(exc.value)


def test_reconcile_labels_and_slides(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label\na,1\nb,\nc,0\nz1,1\nz2,0\n")
    slides = Cohort({"a": Path("a.svs"), "b": Path("b.svs"), "c": Path("c.svs"), "d": Path("d.svs")})
    slides.missing = {"m": Path("/nowhere/m.svs")}
    rec = reconcile(slides, read_manifest(csv))
    assert rec["rows_without_slide"] == ["z1", "z2"]
    assert rec["slides_without_label"] == ["b", "d"]
    assert rec["counts"] == {"rows_without_slide": 2, "slides_without_label": 2, "missing_files": 1}
    lines = format_reconcile(rec, str(csv))
    assert len(lines) == 3 and "2 row(s)" in lines[1] and "z1, z2" in lines[1]
    assert "2 of 4 slide(s) have no label" in lines[2] and "/nowhere/m.svs" in lines[0]
    json.dumps(rec)  # JSON-able: the report shows it
    assert reconcile(slides, {})["slides_without_label"] == []  # no labels: features only, nothing to say
    survival = tmp_path / "surv.csv"
    survival.write_text("slide_id,time,event\na,3.0,1\nc,,\n")
    assert reconcile(slides, read_manifest(survival))["slides_without_label"] == ["b", "c", "d"]


def test_scan_folder_groups_by_series(synthetic_levels, tmp_path):
    l0, l1, _ = synthetic_levels
    files = _dicom_slide(tmp_path / "one", (l1, l1[::2, ::2]))
    scan = scan_folder(tmp_path / "one")
    assert len(scan.series) == 1
    s = scan.series[0]
    assert s.main == files[0] and [h.path for h in s.levels] == files[:2]
    assert [h.associated for h in s.associated] == ["label"]


def test_fingerprints_of_multi_file_slides(synthetic_levels, tmp_path):
    """A DICOM folder or a MIRAX slide is fingerprinted by all of its files: changing any one of them
    (even a data file in the companion folder) changes it; nothing changed: a cache hit, same value."""
    from pipeline.provenance import fingerprints

    l0, l1, _ = synthetic_levels
    _dicom_slide(tmp_path / "d", (l1,), label=False)
    mrxs = tmp_path / "m.mrxs"
    mrxs.write_text("[GENERAL]\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Slidedat.ini").write_text("[GENERAL]\n")
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"a" * 1000)
    cache = tmp_path / "fp.json"
    slides = {"d": tmp_path / "d", "m": mrxs}
    first = fingerprints(slides, cache)
    assert all(len(v) == 64 for v in first.values()) and fingerprints(slides, cache) == first
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"b" * 1000)
    _dicom_slide(tmp_path / "d", (255 - l1,), label=False)  # same file names, other pixels
    second = fingerprints(slides, cache)
    assert second["d"] != first["d"] and second["m"] != first["m"]
