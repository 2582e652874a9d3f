"""Gallery loaders (cdir.galleries) and the `cdir data` command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from cdir import galleries as ds
from cdir.core.errors import CdirError
from cdir.core.manifest import fingerprint, load_manifest
from tests.helpers.trees import (
    DOMAINNET_MINI_CLASSES,
    OFFICEHOME_DOMAINS,
    SHAPE_CLASSES,
    draw_shape,
)

REPO = Path(__file__).resolve().parents[2]


def _img(path: Path, cls: str = "Circle", size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(cls, "Clipart", 0, size).save(path)
    return path


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.DataWarning)
        return fn(*a, **kw)


# ---------------------------------------------------------------------------------------------
# Generic folder


def test_folder_reads_officehome_shaped_tree(officehome_root: Path) -> None:
    df = ds.load_folder(officehome_root)
    assert list(df.columns[:6]) == ["id", "path", "domain", "label", "class_name", "split"]
    assert len(df) == 4 * 4 * 3
    assert df.groupby("domain").size().to_dict() == {d: 12 for d in OFFICEHOME_DOMAINS}
    assert df["id"].is_unique and set(df["split"]) == {"all"}
    row = df[df["id"] == "Real World/Square/00002.jpg"].iloc[0]
    assert row["domain"] == "Real World" and row["class_name"] == "Square"
    assert os.path.isabs(row["path"]) and os.path.isfile(row["path"])
    assert row["label"] == sorted(SHAPE_CLASSES).index("Square")
    # canonical row order: domain, class, id
    assert df.equals(df.sort_values(["domain", "class_name", "id"]).reset_index(drop=True))
    assert df.attrs["root"] == str(officehome_root)


def test_labels_are_byte_sorted_class_names(tmp_path: Path) -> None:
    for cls in ("Table", "TV", "apple", "Alarm_Clock"):
        _img(tmp_path / "d1" / cls / "a.png")
        _img(tmp_path / "d2" / cls / "b.png")
    df = ds.load_folder(tmp_path)
    labels = dict(zip(df["class_name"], df["label"], strict=True))
    # uppercase first, and "TV" < "Table" because 'V' (0x56) < 'a' (0x61)
    assert labels == {"Alarm_Clock": 0, "TV": 1, "Table": 2, "apple": 3}


def test_folder_ignores_hidden_non_images_and_keeps_nested(tmp_path: Path) -> None:
    _img(tmp_path / "photo" / "cat" / "a.jpg")
    _img(tmp_path / "photo" / "cat" / "B.JPEG")  # extension check is case-insensitive
    _img(tmp_path / "photo" / "cat" / "sub" / "c.webp")  # nested below the class folder
    _img(tmp_path / "photo" / "cat" / ".hidden.jpg")
    _img(tmp_path / "photo" / ".cache" / "x.jpg")  # hidden class folder
    _img(tmp_path / ".thumbs" / "cat" / "x.jpg")  # hidden domain folder
    _img(tmp_path / "__MACOSX" / "cat" / "x.jpg")
    (tmp_path / "photo" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "photo" / "cat" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "README.md").write_text("hello")
    df = ds.load_folder(tmp_path)
    assert sorted(df["id"]) == ["photo/cat/B.JPEG", "photo/cat/a.jpg", "photo/cat/sub/c.webp"]
    assert set(df["class_name"]) == {"cat"}


def test_folder_ids_are_stable(officehome_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = ds.load_folder(officehome_root)
    monkeypatch.chdir(officehome_root.parent)
    b = ds.load_folder(officehome_root.name)  # a relative root gives the same manifest
    assert a["id"].tolist() == b["id"].tolist() and a["path"].tolist() == b["path"].tolist()
    assert fingerprint(a) == fingerprint(b)
    assert all("\\" not in i and not i.startswith("/") for i in a["id"])


def test_folder_domains_selection_and_unknown_domain(officehome_root: Path) -> None:
    df = ds.load_folder(officehome_root, domains="Clipart,Art")
    assert sorted(df["domain"].unique()) == ["Art", "Clipart"]
    df = ds.load_folder(officehome_root, domains=["clipart"])  # case-insensitive fallback
    assert set(df["domain"]) == {"Clipart"}
    with pytest.raises(CdirError, match=r"'Sketch' is not in .*available: Art, Clipart, "
                                        r"Product, Real World"):
        ds.load_folder(officehome_root, domains=["Art", "Sketch"])


def test_folder_class_subset(officehome_root: Path) -> None:
    df = ds.load_folder(officehome_root, classes="Triangle,Circle")
    assert sorted(df["class_name"].unique()) == ["Circle", "Triangle"]
    assert dict(zip(df["class_name"], df["label"], strict=True)) == {"Circle": 0, "Triangle": 1}
    with pytest.raises(CdirError, match=r"'Squre' \(did you mean 'Square'\?\)"):
        ds.load_folder(officehome_root, classes=["Squre"])


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CdirError, match="does not exist"):
        ds.load_folder(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(CdirError, match="is not a folder"):
        ds.load_folder(tmp_path / "file.jpg")
    # no domain folders at all (images directly in ROOT)
    flat = tmp_path / "flat"
    _img(flat / "a.jpg")
    with pytest.raises(CdirError, match=r"no domain folders in .*holds 1 image"):
        ds.load_folder(flat)
    # ROOT/<class>/<image>: one level too few
    one = tmp_path / "onelevel"
    _img(one / "cat" / "a.jpg")
    _img(one / "dog" / "b.jpg")
    with pytest.raises(CdirError, match=r"looks like ROOT/<class>/<image>"):
        ds.load_folder(one)
    # domain and class folders but no images
    empty = tmp_path / "empty"
    (empty / "photo" / "cat").mkdir(parents=True)
    (empty / "photo" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(CdirError, match="no images found"):
        ds.load_folder(empty)


def test_folder_split_level_and_loose_files(tmp_path: Path) -> None:
    for dom in ("a", "b"):
        _img(tmp_path / dom / "train" / "cat" / "1.jpg")
        _img(tmp_path / dom / "test" / "cat" / "2.jpg")
        _img(tmp_path / dom / "test" / "dog" / "3.jpg")
    _img(tmp_path / "a" / "train" / "loose.jpg")  # no class folder
    with pytest.warns(ds.DataWarning, match="1 image.*no class folder"):
        df = ds.load_folder(tmp_path)
    assert sorted(df["split"].unique()) == ["test", "train"]
    assert set(df["class_name"]) == {"cat", "dog"}
    assert "a/train/cat/1.jpg" in set(df["id"])
    tr = _quiet(ds.load_folder, tmp_path, split="train")
    assert set(tr["split"]) == {"train"} and len(tr) == 2
    with pytest.raises(CdirError, match="no 'val' images"):
        _quiet(ds.load_folder, tmp_path, split="val")


def test_folder_warns_on_class_coverage(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "cat" / "1.jpg")
    _img(tmp_path / "a" / "dog" / "1.jpg")
    _img(tmp_path / "b" / "cat" / "1.jpg")
    with pytest.warns(ds.DataWarning, match="b lacks dog"):
        ds.load_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Office-Home


@pytest.mark.parametrize("folder", ["Real World", "Real_World", "RealWorld", "Real", "real_world"])
def test_officehome_real_world_renames(make_officehome, folder: str) -> None:
    root = make_officehome(folder_names={"Real World": folder}, per_class=1)
    df = ds.load_officehome(root)
    assert sorted(df["domain"].unique()) == sorted(OFFICEHOME_DOMAINS)
    rw = df[df["domain"] == "Real World"]
    assert len(rw) == 4 and all(i.startswith(folder + "/") for i in rw["id"])


def test_officehome_domain_aliases(officehome_root: Path) -> None:
    for spec in ("Ar,Rw", ["Art", "Real_World"], "art,real", ["Art", "Real World"]):
        df = ds.load_officehome(officehome_root, domains=spec)
        assert sorted(df["domain"].unique()) == ["Art", "Real World"], spec
    with pytest.raises(CdirError, match=r"'Sketch' is not in .*available: Art, Clipart, "
                                        r"Product, Real World"):
        ds.load_officehome(officehome_root, domains="Sketch")


def test_officehome_domain_folders_and_names(make_officehome) -> None:
    root = make_officehome(folder_names={"Real World": "Real_World"}, per_class=1)
    folders = ds.officehome_dirs(str(root))
    assert folders == {"Art": "Art", "Clipart": "Clipart", "Product": "Product",
                       "Real World": "Real_World"}
    names = {"Real World": "Real World", "Real_World": "Real World", "real world": "Real World",
             "Rw": "Real World", "ar": "Art", "Clipart": "Clipart"}
    assert {n: ds.officehome_domain(n, folders) for n in names} == names
    assert ds.officehome_domain("Sketch", folders) is None
    del folders["Product"]  # a canonical name still resolves; the caller sees it is absent
    assert ds.officehome_domain("pr", folders) == "Product"


def test_officehome_train_level_and_archive_top_folder(make_officehome) -> None:
    base = make_officehome(train_level=True, top_folder="OfficeHomeDataset_10072016",
                           folder_names={"Real World": "Real"}, per_class=2)
    parent = base.parent
    df = ds.load_officehome(parent)  # the archive's top folder is found below ROOT
    assert df.attrs["root"] == str(base)
    assert len(df) == 4 * 4 * 2 and set(df["split"]) == {"train"}
    assert "Real/train/Circle/00001.jpg" in set(df["id"])
    assert set(df["domain"]) == set(OFFICEHOME_DOMAINS)
    # the same ids whether ROOT is the parent or the dataset folder itself
    assert fingerprint(ds.load_officehome(base)) == fingerprint(df)
    assert len(ds.load_officehome(parent, split="train")) == len(df)


def test_officehome_single_renamed_subfolder(make_officehome) -> None:
    base = make_officehome(top_folder="office_home", per_class=1)
    df = ds.load_officehome(base.parent)
    assert df.attrs["root"] == str(base) and len(df) == 16


def test_officehome_errors(tmp_path: Path, make_officehome) -> None:
    with pytest.raises(CdirError, match="does not exist"):
        ds.load_officehome(tmp_path / "missing")
    _img(tmp_path / "other" / "Sketch" / "cat" / "1.jpg")
    with pytest.raises(CdirError, match=r"no Office-Home domain folders .* it has Sketch"):
        ds.load_officehome(tmp_path / "other")
    root = make_officehome(per_class=1)
    shutil.copytree(root / "Real World", root / "Real")
    with pytest.raises(CdirError, match="both Office-Home's 'Real World'"):
        ds.load_officehome(root)
    empty = tmp_path / "empty"
    for d in OFFICEHOME_DOMAINS:
        (empty / d / "Mug").mkdir(parents=True)
    with pytest.raises(CdirError, match="no images found"):
        ds.load_officehome(empty)


def test_officehome_warns_on_foreign_folders(make_officehome) -> None:
    root = make_officehome(per_class=1)
    (root / "ImageInfo").mkdir()
    with pytest.warns(ds.DataWarning, match="not Office-Home domains: ImageInfo"):
        df = ds.load_officehome(root)
    assert len(df) == 16


# ---------------------------------------------------------------------------------------------
# DomainNet


def test_domainnet_split_files(make_domainnet) -> None:
    root = make_domainnet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # painting's t-shirt gap is in train only: no warning
        df = ds.load_domainnet(root)
    # 3 domains x 4 classes x 4 images, less painting's 2 t-shirt train images (not listed)
    assert len(df) == 3 * 4 * 4 - 2
    assert df.groupby("split").size().to_dict() == {"test": 24, "train": 22}
    assert "source_label" in df.columns
    # byte-sorted labels: The_Eiffel_Tower first; DomainNet's own order is case-insensitive
    lab = dict(zip(df["class_name"], df["label"], strict=True))
    assert lab == {"The_Eiffel_Tower": 0, "bird": 1, "t-shirt": 2, "zebra": 3}
    src = dict(zip(df["class_name"], df["source_label"], strict=True))
    assert src == {"bird": 0, "t-shirt": 1, "The_Eiffel_Tower": 2, "zebra": 3}
    row = df.iloc[0]
    assert row["id"].count("/") == 2 and os.path.isfile(row["path"])
    assert df.attrs["missing"] == []


def test_domainnet_missing_listed_image_and_tshirt_gap(make_domainnet) -> None:
    gone = "clipart/bird/clipart_002_000099.jpg"
    root = make_domainnet(missing=[gone])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = ds.load_domainnet(root, split="train")
    msgs = [str(w.message) for w in caught if issubclass(w.category, ds.DataWarning)]
    assert any("1 image(s) listed" in m and gone in m for m in msgs), msgs
    assert any("painting lacks t-shirt (known gap" in m for m in msgs), msgs
    assert gone not in set(df["id"]) and df.attrs["missing"] == [gone]
    assert set(df["split"]) == {"train"}
    assert "t-shirt" not in set(df[df["domain"] == "painting"]["class_name"])


def test_domainnet_images_named_in_no_split_file_are_counted(make_domainnet) -> None:
    """Images on disk that no split list names are left out, with one warning that says so."""
    root = make_domainnet()
    extra = Path(root) / "sketch" / "zebra" / "sketch_999_000001.jpg"
    extra.write_bytes(next((Path(root) / "sketch" / "zebra").glob("*.jpg")).read_bytes())
    (Path(root) / "sketch" / "bird" / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = ds.load_domainnet(root, split="test")  # the train images are named: not counted
    msgs = [str(w.message) for w in caught if issubclass(w.category, ds.DataWarning)]
    loose = [m for m in msgs if "named in no split file" in m]
    assert len(loose) == 1 and loose[0].startswith("1 image(s)"), msgs
    assert "sketch/zebra/sketch_999_000001.jpg" in loose[0] and "\n" not in loose[0]
    assert "sketch/zebra/sketch_999_000001.jpg" not in set(df["id"])
    # only the selected classes are looked at
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.load_domainnet(root, classes="bird")


def test_domainnet_class_subsets(make_domainnet, tmp_path: Path) -> None:
    root = make_domainnet(painting_tshirt_gap=False)
    df = ds.load_domainnet(root, classes=["zebra", "bird"])
    assert sorted(df["class_name"].unique()) == ["bird", "zebra"]
    assert dict(zip(df["class_name"], df["label"], strict=True)) == {"bird": 0, "zebra": 1}
    listing = tmp_path / "classes.txt"
    listing.write_text("# my subset\nbird 0\n\nzebra\n")
    assert ds.load_domainnet(root, classes=str(listing))["class_name"].nunique() == 2
    assert ds.load_domainnet(root, classes=listing)["class_name"].nunique() == 2
    assert ds.load_domainnet(root, classes="bird,zebra")["class_name"].nunique() == 2
    with pytest.raises(CdirError, match=r"'zebar' \(did you mean 'zebra'\?\)"):
        ds.load_domainnet(root, classes="bird,zebar")
    with pytest.raises(CdirError, match="does not exist"):
        ds.load_domainnet(root, classes="nope.txt")


def test_ucdir7_is_the_verified_protoot_list() -> None:
    sub = ds.CLASS_SUBSETS["ucdir7"]
    assert sub.classes == ("bird", "feather", "teapot", "tiger", "whale", "windmill", "zebra")
    assert sub.verified is True and "ProtoOT" in sub.source and "loader.py" in sub.source
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified subset resolves without a warning
        assert ds.resolve_classes("ucdir7") == list(sub.classes)
    # an unverified subset still says so
    with pytest.warns(ds.DataWarning, match="unverified"):
        assert ds.resolve_classes("fedbn10") == list(ds.CLASS_SUBSETS["fedbn10"].classes)
    # on a tree without those classes, the user gets told which ones are not there
    assert ds.resolve_classes(["a", "b", "a"]) == ["a", "b"]
    assert ds.resolve_classes(None) is None


def test_domainnet_folder_fallback_and_errors(make_domainnet) -> None:
    root = make_domainnet(split_files=False, domains=("clipart", "quickdraw"))
    df = ds.load_domainnet(root)
    assert set(df["split"]) == {"all"} and "source_label" not in df.columns
    assert len(df) == 2 * 4 * 4
    assert all(p.endswith(".png") for p in df[df["domain"] == "quickdraw"]["path"])
    with pytest.raises(CdirError, match=r"no clipart_train.txt .*--split train needs"):
        ds.load_domainnet(root, split="train")
    with pytest.raises(CdirError, match=r"'real' is not in .*available: clipart, quickdraw"):
        ds.load_domainnet(root, domains="real")
    with pytest.raises(CdirError, match="does not exist"):
        ds.load_domainnet(root / "nope")
    with pytest.raises(CdirError, match="no DomainNet domain folders"):
        ds.load_domainnet(root / "clipart")


def test_domainnet_split_dir_and_parent_root(make_domainnet) -> None:
    root = make_domainnet(split_dir="splits", domains=("sketch",))
    df = ds.load_domainnet(root.parent)  # the dataset folder is found one level down
    assert df.attrs["root"] == str(root)
    assert set(df["split"]) == {"train", "test"} and len(df) == 16
    test = ds.load_domainnet(root, split="test")
    assert len(test) == 8 and set(test["split"]) == {"test"}


def test_domainnet_split_files_are_found_in_usual_subfolders(make_domainnet) -> None:
    root = make_domainnet(split_dir="txt", domains=("sketch", "real"))
    (root / "txt" / "notes_train.txt").write_text("not a DomainNet domain\n")
    files = ds.domainnet_split_files(str(root))
    assert files == {d: {sp: str(root / "txt" / f"{d}_{sp}.txt") for sp in ("train", "test")}
                     for d in ("real", "sketch")}
    assert ds.domainnet_split_files(str(root / "sketch")) == {}


def test_domainnet_images_subfolder_and_missing_domain_folder(make_domainnet) -> None:
    root = make_domainnet(domains=("clipart", "sketch"))
    (root / "images").mkdir()
    shutil.move(root / "clipart", root / "images" / "clipart")
    shutil.move(root / "sketch", root / "images" / "sketch")
    df = ds.load_domainnet(root)  # split files in ROOT, images in ROOT/images (ProtoOT layout)
    assert len(df) == 32 and df.attrs["missing"] == []
    assert all(p.startswith(str(root / "images")) for p in df["path"])
    shutil.rmtree(root / "images" / "sketch")
    with pytest.raises(CdirError, match=r"list sketch images but there is no sketch/ folder"):
        ds.load_domainnet(root)


def test_non_utf8_names_are_skipped(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "cat" / "ok.png")
    bad = os.fsencode(tmp_path / "a" / "cat") + b"/caf\xe9.png"
    try:
        with open(bad, "wb") as f:
            f.write((tmp_path / "a" / "cat" / "ok.png").read_bytes())
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 names")
    with pytest.warns(ds.DataWarning, match="not valid UTF-8"):
        df = ds.load_folder(tmp_path)
    assert df["id"].tolist() == ["a/cat/ok.png"]


def test_domainnet_bad_split_file_line(make_domainnet) -> None:
    root = make_domainnet(domains=("sketch",))
    with open(root / "sketch_test.txt", "a") as f:
        f.write("justafile.jpg 3\n")
    with pytest.raises(CdirError, match=r"sketch_test.txt:\d+: expected"):
        ds.load_domainnet(root)


# ---------------------------------------------------------------------------------------------
# CSV / JSONL


def _table_rows(root: Path, abs_paths: bool = False) -> list[dict]:
    rows = []
    for dom in ("photo", "sketch"):
        for cls in ("cat", "dog"):
            shape = "Circle" if cls == "cat" else "Square"
            p = _img(root / "imgs" / dom / cls / "1.png", cls=shape)
            rows.append({"path": str(p) if abs_paths else f"imgs/{dom}/{cls}/1.png",
                         "domain": dom, "class": cls, "split": "test", "source": "web"})
    return rows


def test_csv_relative_paths_and_extras(tmp_path: Path) -> None:
    pd.DataFrame(_table_rows(tmp_path)).to_csv(tmp_path / "g.csv", index=False)
    df = ds.load_table(tmp_path / "g.csv")
    assert len(df) == 4 and set(df["split"]) == {"test"} and list(df.columns)[-1] == "source"
    assert set(df["id"]) == {f"imgs/{d}/{c}/1.png" for d in ("photo", "sketch")
                             for c in ("cat", "dog")}
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in df["path"])
    assert dict(zip(df["class_name"], df["label"], strict=True)) == {"cat": 0, "dog": 1}
    assert df.attrs["root"] == str(tmp_path / "g.csv")


def test_jsonl_absolute_paths_ids_and_class_name(tmp_path: Path) -> None:
    rows = _table_rows(tmp_path, abs_paths=True)
    for i, r in enumerate(rows):
        r["class_name"] = r.pop("class")
        r["id"] = f"img{i}"
        r["label"] = 7  # a user's own label column is kept aside, not used
    with open(tmp_path / "g.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    df = ds.load_table(tmp_path / "g.jsonl")
    assert sorted(df["id"]) == [f"img{i}" for i in range(4)]
    assert set(df["source_label"]) == {7} and set(df["label"]) == {0, 1}


def test_table_integer_labels_keep_numeric_order(tmp_path: Path) -> None:
    rows = []
    for lab in (2, 10, 0, 1):
        p = _img(tmp_path / f"{lab}.png")
        rows.append({"path": p.name, "domain": "a", "label": lab})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    df = ds.load_table(tmp_path / "t.csv")
    assert sorted(df["class_name"]) == ["00", "01", "02", "10"]
    assert dict(zip(df["id"], df["label"], strict=True)) == {"0.png": 0, "1.png": 1, "2.png": 2,
                                                             "10.png": 3}


def test_table_errors_and_missing_files(tmp_path: Path) -> None:
    pd.DataFrame([{"path": "a.png", "class": "cat"}]).to_csv(tmp_path / "nodom.csv", index=False)
    with pytest.raises(CdirError, match=r"lacks column\(s\) domain; it has path, class"):
        ds.load_table(tmp_path / "nodom.csv")
    pd.DataFrame([{"file": "a.png", "domain": "x"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CdirError, match=r"lacks column\(s\) path, class \(or class_name/label\)"):
        ds.load_table(tmp_path / "bad.csv")
    with pytest.raises(CdirError, match="does not exist"):
        ds.load_table(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("path,domain,class\n")
    with pytest.raises(CdirError, match="no rows"):
        ds.load_table(tmp_path / "empty.csv")
    pd.DataFrame([{"path": "a.png", "domain": "", "class": "cat"}]).to_csv(
        tmp_path / "blank.csv", index=False)
    with pytest.raises(CdirError, match="empty 'domain' in data row 1"):
        ds.load_table(tmp_path / "blank.csv")
    _img(tmp_path / "ok.png")
    pd.DataFrame([{"path": "ok.png", "domain": "x", "class": "c"},
                  {"path": "gone.png", "domain": "x", "class": "c"}]).to_csv(
        tmp_path / "some.csv", index=False)
    with pytest.warns(ds.DataWarning, match="1 file.*gone.png"):
        df = ds.load_table(tmp_path / "some.csv")
    assert df["id"].tolist() == ["ok.png"] and df.attrs["missing"] == ["gone.png"]
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(CdirError, match="unknown table format"):
        ds.load_table(tmp_path / "x.xlsx")


# ---------------------------------------------------------------------------------------------
# `cdir data`


def _ns(**kw) -> argparse.Namespace:
    base = {"domains": None, "classes": None, "split": "all", "no_progress": False}
    base.update(kw)
    return argparse.Namespace(**base)


def test_data_command_officehome(make_officehome, tmp_path: Path, capsys) -> None:
    from cdir.commands import data

    base = make_officehome(folder_names={"Real World": "Real_World"}, per_class=2,
                           top_folder="OfficeHomeDataset_10072016")
    ws = tmp_path / "ws"
    assert data.run(_ns(kind="officehome", root=str(base.parent), workspace=str(ws),
                        domains="Art,Rw")) == 0
    out = capsys.readouterr()
    assert "16 images, 4 classes, 2 domains (Art 8, Real World 8)" in out.out
    assert "scanning" in out.err
    df = load_manifest(ws / "manifest.parquet")
    info = json.loads((ws / "gallery.json").read_text())
    assert info["dataset"] == "officehome" and info["root"] == str(base)
    assert info["counts"] == {"Art": 8, "Real World": 8} and info["classes"] == 4
    assert info["fingerprint"] == fingerprint(df) and info["params"]["domains"] == "Art,Rw"
    assert not (ws / "missing_images.txt").exists()
    # a different selection rewrites the manifest and says that the gallery changed
    data.run(_ns(kind="officehome", root=str(base), workspace=str(ws), domains="Clipart"))
    assert "the gallery changed (fingerprint" in capsys.readouterr().err
    assert set(load_manifest(ws / "manifest.parquet")["domain"]) == {"Clipart"}


def test_data_command_domainnet_lists_missing(make_domainnet, tmp_path: Path, capsys) -> None:
    from cdir.commands import data

    gone = "sketch/zebra/sketch_004_000077.jpg"
    root = make_domainnet(missing=[gone], domains=("clipart", "sketch"))
    ws = tmp_path / "ws"
    data.run(_ns(kind="domainnet", root=str(root), workspace=str(ws), classes="bird,zebra"))
    out = capsys.readouterr()
    assert "warning: 1 image(s) listed" in out.err
    assert (ws / "missing_images.txt").read_text().split() == [gone]
    info = json.loads((ws / "gallery.json").read_text())
    assert info["params"]["class_list"] == ["bird", "zebra"] and info["classes"] == 2
    assert load_manifest(ws / "manifest.parquet")["split"].isin(["train", "test"]).all()


def test_data_command_csv_and_workspace_inside_folder(tmp_path: Path) -> None:
    from cdir.commands import data

    pd.DataFrame(_table_rows(tmp_path)).to_csv(tmp_path / "g.csv", index=False)
    data.run(_ns(kind="csv", root=str(tmp_path / "g.csv"), workspace=str(tmp_path / "ws")))
    assert json.loads((tmp_path / "ws" / "gallery.json").read_text())["dataset"] == "table"
    with pytest.raises(CdirError, match="inside the image folder"):
        data.run(_ns(kind="folder", root=str(tmp_path / "imgs"),
                     workspace=str(tmp_path / "imgs" / "ws")))
    data.run(_ns(kind="folder", root=str(tmp_path / "imgs"),
                 workspace=str(tmp_path / "imgs" / ".cdir")))  # hidden: fine
    assert len(load_manifest(tmp_path / "imgs" / ".cdir" / "manifest.parquet")) == 4


def test_cdir_data_via_cli(officehome_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("cdir.cli")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ws = tmp_path / "ws"
    r = subprocess.run([sys.executable, "-m", "cdir", "data", "folder", str(officehome_root),
                        "-w", str(ws), "--classes", "Circle,Square"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "24 images, 2 classes, 4 domains" in r.stdout
    assert len(load_manifest(ws / "manifest.parquet")) == 24
    r = subprocess.run([sys.executable, "-m", "cdir", "data", "officehome",
                        str(tmp_path / "nope"), "-w", str(ws)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    nope = tmp_path / "nope"
    assert r.stderr.strip() == f"cdir data: error: dataset folder {nope} does not exist"


def test_data_command_emoji(tmp_path: Path, capsys) -> None:
    from cdir.commands import data

    ws = tmp_path / "ws"
    data.run(argparse.Namespace(kind="emoji", workspace=str(ws), limit=3, size=32,
                                no_progress=False))
    df = load_manifest(ws / "manifest.parquet")
    info = json.loads((ws / "gallery.json").read_text())
    assert info["dataset"] == "emoji" and info["root"] == str(ws / "gallery")
    assert len(info["counts"]) == 3 and set(info["counts"].values()) == {3}
    assert len(df) == 9 and df["class_name"].nunique() == 3
    assert info["params"] == {"limit": 3, "size": 32}
    assert "9 images, 3 classes, 3 domains" in capsys.readouterr().out


def test_shared_fixtures_are_sane(officehome_root: Path, corrupt_dir: Path) -> None:
    from PIL import Image

    from tests.helpers.trees import CORRUPT_FILES

    assert sorted(p.name for p in corrupt_dir.iterdir()) == sorted(CORRUPT_FILES)
    # every class has its own dominant colour, in every domain
    for dom in OFFICEHOME_DOMAINS:
        for cls in SHAPE_CLASSES:
            with Image.open(officehome_root / dom / cls / "00001.jpg") as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    assert DOMAINNET_MINI_CLASSES[0] == "The_Eiffel_Tower"
