"""Dataset registry: annotation parsers that turn official files into a list of labelled videos.

Every parser returns :class:`Annotations`: the class names (their order is the label index), the
videos in file order, and the problems (missing file, unknown label, malformed line, a file listed again) as
``(video id or file:line, reason)`` pairs. A problem never stops the parse: that video is recorded
as failed and the rest go on. Splits are normalised to ``train`` / ``val`` / ``test``.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")


class AnnotationError(UserError, ValueError):
    """An annotation set that cannot be read at all (wrong file, wrong format)."""


@dataclass(frozen=True)
class VideoRecord:
    id: str
    path: str  # absolute path of the video file
    labels: tuple[int, ...]  # class indices; several for multi-label datasets
    split: str  # train | val | test


@dataclass
class Annotations:
    classes: list[str]
    videos: list[VideoRecord] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


Parser = Callable[[list[str], str, "str | None"], Annotations]


Prepare = Callable[[str, int, bool], None]  # (video root, seed, progress): make the dataset there if missing


@dataclass(frozen=True)
class DatasetFormat:
    """A registered annotation format: its parser, whether it can do without annotation files,
    its default video folder under ``data/`` and, for a generated dataset, what makes it."""

    parse: Parser
    needs_annotations: bool  # False: readable from the video root alone (no annotation file given)
    video_root: str = ""  # default folder under data/ ("": <name>/videos)
    prepare: Prepare | None = None  # called when no annotations are given (the demo generates itself)


DATASETS: dict[str, DatasetFormat] = {}


def register_dataset(name: str, *, needs_annotations: bool = True, video_root: str = "",
                     prepare: Prepare | None = None) -> Callable[[Parser], Parser]:
    def add(parser: Parser) -> Parser:
        if name in DATASETS:
            raise ValueError(f"dataset format {name!r} is registered twice")
        DATASETS[name] = DatasetFormat(parser, needs_annotations, video_root, prepare)
        return parser

    return add


def load_annotations(name: str, annotations: list[str], video_root: str, classes: str | None = None) -> Annotations:
    """Parse ``annotations`` of dataset ``name``; video paths are resolved under ``video_root``.

    One file is one video: a second entry of the same file (the same id again, or another path to it:
    ``./a.mp4``, ``sub/../a.mp4``, a symlink; compared by ``os.path.realpath``) is an annotation problem,
    the first entry is kept. Raises :class:`AnnotationError` for an empty annotation file and for
    annotations that list no usable video, before anything is written.
    """
    if name not in DATASETS:
        raise AnnotationError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    for path in annotations + ([classes] if classes else []):
        if not os.path.isfile(path):
            raise AnnotationError(f"annotation file {path} does not exist")
        if _blank(path):
            raise AnnotationError(f"annotation file {path} is empty")
    if not os.path.isdir(video_root):
        raise AnnotationError(f"video root {video_root} is not a folder")
    result = DATASETS[name].parse(annotations, video_root, classes)
    by_file: dict[str, VideoRecord] = {}  # real path -> first entry
    by_id: dict[str, VideoRecord] = {}
    unique = []
    for video in result.videos:
        real = os.path.realpath(video.path)
        kept = by_file.get(real) or by_id.get(video.id)
        if kept is not None:
            result.problems.append((video.id, _duplicate(video, kept)))
        else:
            by_file[real] = by_id[video.id] = video
            unique.append(video)
    result.videos = unique
    if not unique:
        where = ", ".join(annotations) or video_root
        detail = f": all {len(result.problems)} entries have problems, e.g. {result.problems[0][1]}" \
            if result.problems else ""
        raise AnnotationError(f"no usable video in {where}{detail}")
    return result


def _duplicate(video: VideoRecord, kept: VideoRecord) -> str:
    """Why ``video`` is dropped: it is the file of the entry ``kept`` (listed earlier)."""
    same = "listed twice" if video.id == kept.id else f"same file as {kept.id}"
    if video.split != kept.split:
        return f"{same}, already in {kept.split}: one file cannot be in {kept.split} and {video.split}, " \
               f"the {kept.split} entry is kept"
    if video.labels != kept.labels:
        return f"{same} with other labels {list(video.labels)}; the first entry ({list(kept.labels)}) is kept"
    return f"{same}; the first entry is kept"


def _blank(path: str) -> bool:
    """Whether the file holds nothing but white space."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.strip():
                return False
    return True


# ---------------------------------------------------------------- helpers shared by the parsers

def split_from_filename(path: str) -> str:
    """``trainlist01.txt`` -> train, ``*val*`` -> val, anything else -> test."""
    name = os.path.basename(path).lower()
    return "train" if "train" in name else "val" if "val" in name else "test"


def read_class_list(path: str) -> list[str]:
    """Class names in label order, one class per line: ``name`` (line order; kept verbatim, a name
    ending in a number too), or ``index name`` on every line (indices 0..n-1 or 1..n, each once, in any
    order: UCF101's classInd.txt). Refuses in one line (:class:`AnnotationError` naming file and line)
    what could be read two ways or is incomplete: a name or index listed twice, a missing index, lines
    with and without an index, and lines that all end in an index-like number out of line order
    (``name index``: then the line order would not be the label order)."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise AnnotationError(f"class list {path} is empty")
    heads = [line.split(None, 1) for _, line in lines]
    indexed = [len(parts) == 2 and _is_index(parts[0]) for parts in heads]
    if all(indexed):
        rows = [(int(parts[0]), parts[1], n) for parts, (n, _) in zip(heads, lines, strict=True)]
        _check_indices(path, [(index, n) for index, _, n in rows])
    elif any(indexed):
        raise AnnotationError(f"{path}:{lines[indexed.index(True)][0]} starts with an index and line "
                              f"{lines[indexed.index(False)][0]} does not: write every line as 'index name' "
                              "or as a name alone")
    else:
        rows = [(k, line, n) for k, (n, line) in enumerate(lines)]
        tails = [line.rsplit(None, 1) for _, line in lines]
        if all(len(t) == 2 and _is_index(t[1]) for t in tails):
            numbers = [int(t[1]) for t in tails]
            if sorted(numbers) in (list(range(len(lines))), list(range(1, len(lines) + 1))) \
                    and numbers != sorted(numbers):
                raise AnnotationError(f"{path}: every line ends in a number, and read as 'name index' the labels "
                                      "would not follow the lines: write 'index name' lines or names alone")
    seen: dict[str, int] = {}
    for _, name, n in rows:
        if name in seen:
            raise AnnotationError(f"{path}:{n}: class {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = n
    return [name for _, name, _ in sorted(rows)]


def _is_index(token: str) -> bool:
    return token.isascii() and token.isdigit()


def _check_indices(path: str, indices: list[tuple[int, int]]) -> None:
    """``(index, line number)`` pairs: the indices must be 0..n-1 or 1..n, each once."""
    seen: dict[int, int] = {}
    for index, n in indices:
        if index in seen:
            raise AnnotationError(f"{path}:{n}: class index {index} is listed twice (first at line {seen[index]})")
        seen[index] = n
    base = min(seen)
    missing = sorted(set(range(base, base + len(seen))) - set(seen))
    if base not in (0, 1) or missing:
        what = f"index {missing[0]} is missing" if base in (0, 1) else f"the first index is {base}"
        raise AnnotationError(f"{path}: class indices must run 0..{len(seen) - 1} or 1..{len(seen)}; {what}")


class _Resolver:
    """Finds video files under the root: by relative path, or by file name / stem anywhere below it."""

    def __init__(self, root: str):
        self.root = root
        self._by_name: dict[str, str] | None = None

    def relative(self, rel: str) -> str | None:
        path = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
        return path if os.path.isfile(path) else None

    def named(self, *candidates: str) -> str | None:
        if self._by_name is None:
            self._by_name = {}
            for folder, _, files in sorted(os.walk(self.root)):
                for name in sorted(files):
                    full = os.path.join(folder, name)
                    self._by_name.setdefault(name, full)
                    if name.lower().endswith(VIDEO_EXTENSIONS):
                        self._by_name.setdefault(os.path.splitext(name)[0], full)
        for candidate in candidates:
            if candidate in self._by_name:
                return self._by_name[candidate]
        return None


def _labels(tokens: list[str], classes: list[str], where: str) -> tuple[tuple[int, ...], str | None]:
    """Integer label tokens -> indices, or the reason they are not valid."""
    labels = []
    for token in tokens:
        token = token.strip()
        if not token.lstrip("-").isdigit():
            return (), f"{where}: label {token!r} is not an integer class index"
        if not 0 <= int(token) < len(classes):
            return (), f"{where}: label {token} is not in the class list ({len(classes)} classes)"
        labels.append(int(token))
    if not labels:
        return (), f"{where}: no label"
    return tuple(sorted(set(labels))), None


def _add(result: Annotations, resolver: _Resolver, vid: str, rel: str, labels, split: str, reason, where: str,
         path: str | None = None) -> None:
    if reason:
        result.problems.append((vid, reason))
        return
    path = path or resolver.relative(rel)
    if path is None:
        result.problems.append((vid, f"{where}: video file {rel} not found under {resolver.root}"))
        return
    result.videos.append(VideoRecord(id=vid, path=path, labels=labels, split=split))


def _lines(path: str):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{number}", line.rstrip("\n\r")


def _numbered_classes(classes: str | None, count: int) -> list[str]:
    return read_class_list(classes) if classes else [str(i) for i in range(count)]


def parse_label_lists(paths: list[str], root: str, class_names: list[str], line_format: str) -> Annotations:
    """Lists with one video per line: ``space`` = ``<path> <label> [<label> ...]`` (mmaction2),
    ``frames`` = ``<path with spaces> <num_frames> <label>`` (AR-Net Mini-Kinetics),
    ``comma`` = ``<path>,<num_frames>,<label>[,<label> ...]`` (AR-Net FCVID)."""
    result = Annotations(classes=class_names)
    resolver = _Resolver(root)
    for path in paths:
        split = split_from_filename(path)
        for where, line in _lines(path):
            if line_format == "comma":
                parts = line.split(",")
                rel, label_tokens, ok = parts[0].strip(), parts[2:], len(parts) >= 3
            elif line_format == "frames":
                parts = line.rsplit(None, 2)
                rel, label_tokens, ok = parts[0].strip(), parts[2:], len(parts) == 3
            else:
                parts = line.split()
                rel, label_tokens, ok = parts[0], parts[1:], len(parts) >= 2
            if not ok:
                result.problems.append((where, f"{where}: malformed line {line!r}"))
                continue
            labels, reason = _labels(label_tokens, class_names, where)
            _add(result, resolver, rel, rel, labels, split, reason, where)
    return result


# ---------------------------------------------------------------- the datasets

FCVID_NUM_CLASSES = 239


@register_dataset("fcvid")
def parse_fcvid(paths: list[str], root: str, classes: str | None) -> Annotations:
    """FCVID: the official split file (``<path> train|test``) with the label matrix (one
    whitespace-separated multi-hot row of 239 columns per video, row-aligned), or AR-Net's comma
    lists (``<path>,<num_frames>,<label>[,<label>...]``, split from the file name)."""
    class_names = _numbered_classes(classes, FCVID_NUM_CLASSES)
    kinds: dict[str, list[str]] = {"comma": [], "split": [], "matrix": []}
    for path in paths:
        first = next((line for _, line in _lines(path)), "")
        tokens = first.split()
        if "," in first:
            kinds["comma"].append(path)
        elif tokens and all(t in ("0", "1") for t in tokens) and len(tokens) > 2:
            kinds["matrix"].append(path)
        elif len(tokens) >= 2 and tokens[-1] in ("train", "test"):
            kinds["split"].append(path)
        else:
            raise AnnotationError(f"{path}: neither an FCVID split file, a label matrix nor an AR-Net list")
    if kinds["comma"]:
        return parse_label_lists(kinds["comma"], root, class_names, "comma")
    if len(kinds["split"]) != 1 or len(kinds["matrix"]) != 1:
        raise AnnotationError("FCVID needs its split file and its label matrix (--annotations twice), or AR-Net lists")
    split_lines = list(_lines(kinds["split"][0]))
    matrix_lines = list(_lines(kinds["matrix"][0]))
    if len(split_lines) != len(matrix_lines):
        raise AnnotationError(
            f"{kinds['split'][0]} has {len(split_lines)} videos but {kinds['matrix'][0]} has {len(matrix_lines)} rows"
        )
    result = Annotations(classes=class_names)
    resolver = _Resolver(root)
    for (where, line), (mwhere, row) in zip(split_lines, matrix_lines, strict=True):
        rel, _, split = line.rpartition(" ")
        rel = rel.strip()
        values = row.split()
        reason = None
        if not rel or split not in ("train", "test"):
            result.problems.append((where, f"{where}: malformed line {line!r}"))
            continue
        if len(values) != len(class_names) or any(v not in ("0", "1") for v in values):
            reason = f"{mwhere}: expected {len(class_names)} 0/1 columns, got {row[:40]!r}"
        labels = tuple(i for i, v in enumerate(values) if v == "1")
        if not reason and not labels:
            reason = f"{mwhere}: row has no positive label"
        _add(result, resolver, rel, rel, labels, split, reason, where)
    return result


@register_dataset("activitynet")
def parse_activitynet(paths: list[str], root: str, classes: str | None) -> Annotations:
    """ActivityNet v1.3 JSON: ``database -> id -> {subset, annotations[].label}``. Classes are the
    taxonomy's leaf nodes (or the label set), sorted by name. Unlabelled testing videos are skipped.
    Files may be named ``v_<id>.*`` or ``<id>.*`` anywhere under the root."""
    if len(paths) != 1:
        raise AnnotationError("ActivityNet needs exactly one JSON file (activity_net.v1-3.min.json)")
    try:
        with open(paths[0], encoding="utf-8") as f:
            data = json.load(f)
        database = data["database"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AnnotationError(f"{paths[0]}: not an ActivityNet JSON ({type(err).__name__}: {err})") from None
    if classes:
        class_names = read_class_list(classes)
    elif data.get("taxonomy"):
        parents = {node.get("parentId") for node in data["taxonomy"]}
        class_names = sorted({node["nodeName"] for node in data["taxonomy"] if node["nodeId"] not in parents})
    else:
        class_names = sorted({a["label"] for v in database.values() for a in v.get("annotations", [])})
    index = {name: i for i, name in enumerate(class_names)}
    subsets = {"training": "train", "validation": "val", "testing": "test"}
    result = Annotations(classes=class_names)
    resolver = _Resolver(root)
    for vid, entry in database.items():
        where = f"{paths[0]}:database[{vid!r}]"
        names = {a.get("label") for a in entry.get("annotations", [])}
        if not names:
            continue  # the unlabelled testing subset
        unknown = sorted(str(n) for n in names if n not in index)
        reason = f"{where}: label {unknown[0]!r} is not in the class list" if unknown else None
        if entry.get("subset") not in subsets:
            reason = reason or f"{where}: unknown subset {entry.get('subset')!r}"
        labels = tuple(sorted(index[n] for n in names if n in index))
        path = resolver.named(f"v_{vid}", vid) if not reason else None
        if not reason and path is None:
            reason = f"{where}: no file v_{vid}.* or {vid}.* under {root}"
        _add(result, resolver, vid, "", labels, subsets.get(entry.get("subset"), ""), reason, where, path)
    return result


MINIK_NUM_CLASSES = 200


@register_dataset("minik")
def parse_minik(paths: list[str], root: str, classes: str | None) -> Annotations:
    """Mini-Kinetics lists as AR-Net/AdaFocus write them: ``<path> <num_frames> <label>`` (paths
    may contain spaces), split from the file name, class names from ``--classes``."""
    return parse_label_lists(paths, root, _numbered_classes(classes, MINIK_NUM_CLASSES), "frames")


@register_dataset("kinetics")
def parse_kinetics(paths: list[str], root: str, classes: str | None) -> Annotations:
    """Kinetics CSV ``label,youtube_id,time_start,time_end,split[,is_cc]``; files are
    ``<id>_<start:06d>_<end:06d>.mp4`` anywhere under the root (flat or per class)."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"label", "youtube_id", "time_start", "time_end", "split"} - set(reader.fieldnames or [])
            if missing:
                raise AnnotationError(f"{path}: not a Kinetics CSV, missing columns {sorted(missing)}")
            rows += [(f"{path}:{n}", row) for n, row in enumerate(reader, 2)]
    class_names = read_class_list(classes) if classes else sorted({r["label"] for _, r in rows if r["label"]})
    index = {name: i for i, name in enumerate(class_names)}
    result = Annotations(classes=class_names)
    resolver = _Resolver(root)
    for where, row in rows:
        try:
            vid = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
        except (TypeError, ValueError):
            result.problems.append((where, f"{where}: malformed row {row}"))
            continue
        reason = None if row["label"] in index else f"{where}: label {row['label']!r} is not in the class list"
        path = resolver.named(vid + ".mp4", vid) if not reason else None
        if not reason and path is None:
            reason = f"{where}: video file {vid}.mp4 not found under {root}"
        split = {"validate": "val", "validation": "val"}.get(row["split"], row["split"])
        _add(result, resolver, vid, "", (index.get(row["label"], -1),), split, reason, where, path)
    return result


@register_dataset("list", needs_annotations=False)
def parse_list(paths: list[str], root: str, classes: str | None) -> Annotations:
    """mmaction2-style lists ``<path> <label> [<label> ...]`` (split from the file name), or, with
    no annotation file, a folder per class under the root (``root/[train|val|test/]<class>/<video>``)."""
    if paths:
        largest = 0
        for path in paths:
            for _, line in _lines(path):
                largest = max([largest] + [int(t) + 1 for t in line.split()[1:] if t.isdigit()])
        return parse_label_lists(paths, root, _numbered_classes(classes, largest), "space")
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    layout = [(s, os.path.join(root, s)) for s in split_dirs] or [("train", root)]
    class_names = read_class_list(classes) if classes else sorted(
        {d for _, top in layout for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))}
    )
    result = Annotations(classes=class_names)
    for split, top in layout:
        for label, name in enumerate(class_names):
            folder = os.path.join(top, name)
            for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if file.lower().endswith(VIDEO_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(folder, file), root)
                    result.videos.append(VideoRecord(rel, os.path.join(folder, file), (label,), split))
    return result
