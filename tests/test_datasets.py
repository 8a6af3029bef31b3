"""Parsers of every annotation format, on small fixture files."""
import json

import pytest

from extract.datasets import AnnotationError, load_annotations


def touch(root, *rels):
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_fcvid_official_split_and_label_matrix(tmp_path):
    touch(tmp_path, "a/v1.mp4", "a/v2.mp4", "b/v3.mp4")
    (tmp_path / "split.txt").write_text("a/v1.mp4 train\na/v2.mp4 test\nb/v3.mp4 test\nb/missing.mp4 train\n")
    rows = []
    for labels in ([0], [1, 238], [], [5]):
        row = ["0"] * 239
        for i in labels:
            row[i] = "1"
        rows.append(" ".join(row))
    (tmp_path / "labels.txt").write_text("\n".join(rows) + "\n")
    ann = load_annotations("fcvid", [str(tmp_path / "split.txt"), str(tmp_path / "labels.txt")], str(tmp_path))
    assert len(ann.classes) == 239
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("a/v1.mp4", (0,), "train"),
                                                                ("a/v2.mp4", (1, 238), "test")]
    reasons = dict(ann.problems)
    assert "no positive label" in reasons["b/v3.mp4"] and "labels.txt:3" in reasons["b/v3.mp4"]
    assert "not found" in reasons["b/missing.mp4"] and "split.txt:4" in reasons["b/missing.mp4"]


def test_fcvid_arnet_comma_lists(tmp_path):
    touch(tmp_path, "x/a.mp4", "x/b.mp4")
    (tmp_path / "fcvid_train.txt").write_text("x/a.mp4,120,3\nx/b.mp4,99,4,7\nbroken line\nx/a.mp4,5,300\n")
    ann = load_annotations("fcvid", [str(tmp_path / "fcvid_train.txt")], str(tmp_path))
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("x/a.mp4", (3,), "train"), ("x/b.mp4", (4, 7), "train")]
    messages = " | ".join(r for _, r in ann.problems)
    assert "fcvid_train.txt:3: malformed line" in messages
    assert "fcvid_train.txt:4: label 300 is not in the class list (239 classes)" in messages


def test_activitynet_json_taxonomy_and_prefixes(tmp_path):
    touch(tmp_path, "videos/v_abc.mp4", "videos/def.mkv")
    data = {
        "taxonomy": [{"nodeId": 1, "parentId": None, "nodeName": "Root"},
                     {"nodeId": 2, "parentId": 1, "nodeName": "Sports"},
                     {"nodeId": 3, "parentId": 2, "nodeName": "Surfing"},
                     {"nodeId": 4, "parentId": 2, "nodeName": "Archery"},
                     {"nodeId": 5, "parentId": 1, "nodeName": "Cooking"}],
        "database": {
            "abc": {"subset": "training", "annotations": [{"label": "Surfing"}, {"label": "Archery"}]},
            "def": {"subset": "validation", "annotations": [{"label": "Cooking"}]},
            "ghi": {"subset": "validation", "annotations": [{"label": "Knitting"}]},
            "jkl": {"subset": "training", "annotations": [{"label": "Surfing"}]},
            "tst": {"subset": "testing", "annotations": []},
        },
    }
    (tmp_path / "anet.json").write_text(json.dumps(data))
    ann = load_annotations("activitynet", [str(tmp_path / "anet.json")], str(tmp_path / "videos"))
    assert ann.classes == ["Archery", "Cooking", "Surfing"]
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("abc", (0, 2), "train"), ("def", (1,), "val")]
    assert ann.videos[0].path.endswith("v_abc.mp4") and ann.videos[1].path.endswith("def.mkv")
    reasons = dict(ann.problems)
    assert "'Knitting' is not in the class list" in reasons["ghi"]
    assert "no file v_jkl.* or jkl.*" in reasons["jkl"]


def test_minik_paths_with_spaces_and_class_list(tmp_path):
    touch(tmp_path, "abseiling/clip one.mp4", "zumba/two.mp4")
    (tmp_path / "classes.txt").write_text("abseiling\nzumba\n")
    (tmp_path / "mini_val.txt").write_text("abseiling/clip one.mp4 250 0\nzumba/two.mp4 300 1\nzumba/two.mp4 300\n")
    ann = load_annotations("minik", [str(tmp_path / "mini_val.txt")], str(tmp_path), str(tmp_path / "classes.txt"))
    assert ann.classes == ["abseiling", "zumba"]
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("abseiling/clip one.mp4", (0,), "val"),
                                                                ("zumba/two.mp4", (1,), "val")]
    assert "mini_val.txt:3: malformed line" in ann.problems[0][1]


def test_kinetics_csv(tmp_path):
    touch(tmp_path, "abseiling/aaa_000010_000020.mp4", "bbb_000000_000010.mp4")
    (tmp_path / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,aaa,10,20,train,0\nzumba,bbb,0,10,train,0\nzumba,ccc,5,15,train,0\n")
    (tmp_path / "classes.txt").write_text("abseiling\nzumba\n")
    ann = load_annotations("kinetics", [str(tmp_path / "train.csv")], str(tmp_path))
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("aaa_000010_000020", (0,), "train"),
                                                                ("bbb_000000_000010", (1,), "train")]
    assert "ccc_000005_000015.mp4 not found" in ann.problems[0][1]
    (tmp_path / "bad.csv").write_text("youtube_id,label\nx,y\n")
    with pytest.raises(AnnotationError, match="missing columns"):
        load_annotations("kinetics", [str(tmp_path / "bad.csv")], str(tmp_path))


def test_list_file_and_folder_per_class(tmp_path):
    touch(tmp_path, "train/cat/a.mp4", "train/dog/b.avi", "val/dog/c.mp4", "train/dog/notes.txt")
    ann = load_annotations("list", [], str(tmp_path))
    assert ann.classes == ["cat", "dog"]
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [
        ("train/cat/a.mp4", (0,), "train"), ("train/dog/b.avi", (1,), "train"), ("val/dog/c.mp4", (1,), "val")]
    (tmp_path / "testlist.txt").write_text("train/cat/a.mp4 0 1\nval/dog/c.mp4 x\n")
    ann = load_annotations("list", [str(tmp_path / "testlist.txt")], str(tmp_path))
    assert [(v.id, v.labels, v.split) for v in ann.videos] == [("train/cat/a.mp4", (0, 1), "test")]
    assert "label 'x' is not an integer" in ann.problems[0][1]


def test_wrong_paths_are_one_clear_error(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        load_annotations("list", [str(tmp_path / "nope.txt")], str(tmp_path))
    with pytest.raises(AnnotationError, match="is not a folder"):
        load_annotations("list", [], str(tmp_path / "nowhere"))
    with pytest.raises(AnnotationError, match="unknown dataset"):
        load_annotations("ucf", [], str(tmp_path))


def test_demo_lists(demo_root):
    ann = load_annotations("demo", [], demo_root)
    assert len(ann.classes) == 10 and len(ann.videos) == 20 and not ann.problems
    assert {v.split for v in ann.videos} == {"train", "test"}


def test_the_demo_is_the_same_files_made_by_one_thread_or_several(tmp_path, monkeypatch):
    """Video i depends only on (seed, i): one thread per core writes the bytes one thread writes."""
    import hashlib
    import os

    from extract import demo

    def digests(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))}

    small = dict(seed=5, videos_per_class=1, frames=12, test_fraction=0.5, progress=False)
    demo.generate_demo(str(tmp_path / "pool"), **small)  # 10 videos over min(8, cores) threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one core: one thread
    demo.generate_demo(str(tmp_path / "one"), **small)
    pool, one = digests(tmp_path / "pool"), digests(tmp_path / "one")
    assert len(pool) == 10 + 4 and pool == one  # videos, lists, classes and seed


def test_registry_says_which_formats_read_without_annotation_files():
    from extract.datasets import DATASETS

    assert sorted(name for name, fmt in DATASETS.items() if not fmt.needs_annotations) == ["demo", "list"]


def test_one_file_under_several_ids_is_kept_once(tmp_path):
    """``a.mp4``, ``./a.mp4``, ``sub/../a.mp4`` and a symlink are one video: the first entry is kept, the
    others are annotation problems saying which entry they repeat (and that two splits would leak)."""
    touch(tmp_path, "a.mp4", "b.mp4", "sub/c.mp4")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a.mp4")
    (tmp_path / "trainlist.txt").write_text("a.mp4 0\n./a.mp4 0\nb.mp4 1\n")
    (tmp_path / "testlist.txt").write_text("sub/../a.mp4 0\nlink.mp4 0\nsub/c.mp4 1\nb.mp4 0\n")
    ann = load_annotations("list", [str(tmp_path / "trainlist.txt"), str(tmp_path / "testlist.txt")], str(tmp_path))
    assert [(v.id, v.split) for v in ann.videos] == [("a.mp4", "train"), ("b.mp4", "train"), ("sub/c.mp4", "test")]
    reasons = dict(ann.problems)
    assert reasons["./a.mp4"] == "same file as a.mp4; the first entry is kept"
    for vid in ("sub/../a.mp4", "link.mp4"):
        assert reasons[vid].startswith("same file as a.mp4, already in train: one file cannot be in train and test")
    assert reasons["b.mp4"].startswith("listed twice, already in train")


@pytest.mark.parametrize("text, names", [
    ("1 ApplyEyeMakeup\n2 Archery\n\n3 Biking\n", ["ApplyEyeMakeup", "Archery", "Biking"]),  # UCF101's classInd
    ("2 c\n0 a\n1 b two\n", ["a", "b two", "c"]),
    ("walking 2\nrunning 2\n", ["walking 2", "running 2"]),  # names ending in a number stay as they are
    ("abseiling\nzumba 1\n", ["abseiling", "zumba 1"]),
    ("level 1\nlevel 2\nlevel 3\n", ["level 1", "level 2", "level 3"]),
    ("\ufeffred\nblue\n", ["red", "blue"]),  # a byte-order mark is not part of the first name
])
def test_class_lists_are_read_verbatim_or_by_index(tmp_path, text, names):
    from extract.datasets import read_class_list

    (tmp_path / "classes.txt").write_text(text, encoding="utf-8")
    assert read_class_list(str(tmp_path / "classes.txt")) == names


@pytest.mark.parametrize("text, message", [
    ("a\nb\na\n", r"classes.txt:3: class 'a' is listed twice \(first at line 1\)"),
    ("0 a\n0 b\n1 c\n", r"classes.txt:2: class index 0 is listed twice \(first at line 1\)"),
    ("0 a\n2 b\n", "classes.txt: class indices must run 0..1 or 1..2; index 1 is missing"),
    ("3 a\n4 b\n", "the first index is 3"),
    ("1 a\nb\n", "classes.txt:1 starts with an index and line 2 does not"),
    ("b 1\na 0\n", "every line ends in a number"),
    ("\n  \n", "is empty"),
])
def test_ambiguous_class_lists_are_refused_in_one_line(tmp_path, text, message):
    from extract.datasets import read_class_list

    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(AnnotationError, match=message) as err:
        read_class_list(str(tmp_path / "classes.txt"))
    assert "\n" not in str(err.value)


def test_annotations_without_a_video_are_refused(tmp_path):
    touch(tmp_path, "a.mp4")
    (tmp_path / "trainlist.txt").write_text("\n \n")
    with pytest.raises(AnnotationError, match="trainlist.txt is empty"):
        load_annotations("list", [str(tmp_path / "trainlist.txt")], str(tmp_path))
    (tmp_path / "trainlist.txt").write_text("gone.mp4 0\n")
    with pytest.raises(AnnotationError, match="no usable video in .*trainlist.txt: all 1 entries have problems, "
                                              "e.g. .*gone.mp4 not found"):
        load_annotations("list", [str(tmp_path / "trainlist.txt")], str(tmp_path))
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n")
    with pytest.raises(AnnotationError, match="no usable video in .*k.csv$"):
        load_annotations("kinetics", [str(tmp_path / "k.csv")], str(tmp_path))
    (tmp_path / "no_classes").mkdir()
    with pytest.raises(AnnotationError, match="no usable video in .*no_classes$"):
        load_annotations("list", [], str(tmp_path / "no_classes"))
