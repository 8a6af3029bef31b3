"""Report registry: the papers' tables and figures computed from run folders.

A report is a table (``columns`` x ``rows``), notes, and optionally a figure. Numbers: mAP and
top-1 in %, GFLOPs in GMACs per frame (``GFLOPs/f``, over every sampled frame, skipped ones
included) and per video (``GFLOPs/V``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Callable

import numpy as np
import torch

from extract.cache import Cache
from extract.metrics import hit_at_k, mean_average_precision
from policy.methods import METHODS
from policy.methods.base import Ablation
from policy.ops import numpy, spread_index
from policy.run_folder import FRAME_SCORES, RUN_ID, STEP_GFLOPS, STEP_SCORES

from .published import published_rows
from .runs import Run, RunError

METRIC_COLUMNS = ["mAP", "top1", "GFLOPs/f", "GFLOPs/V"]


@dataclass
class Report:
    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figure: Callable | None = None  # figure(matplotlib.figure.Figure) draws it
    figure_size: tuple[float, float] = (8.0, 5.0)  # inches

    @property
    def empty(self) -> bool:
        return not any(r.get("source") == "ours" for r in self.rows)


@dataclass
class Options:
    ap: str = "sklearn"  # a key of extract.metrics.AP_KINDS
    paper: bool = False
    videos: int = 4  # frames report: how many videos


REPORTS: dict[str, Callable[[list[Run], Options], Report]] = {}


def register_report(name: str):
    def add(fn):
        if name in REPORTS:
            raise ValueError(f"report {name!r} is registered twice")
        REPORTS[name] = fn
        return fn

    return add


def cache_name(run: Run) -> str:
    """The cache a run was trained on, named by its file without the extension (``demo-seed1_t16``)."""
    return os.path.splitext(os.path.basename(run.cache))[0]


def run_row(run: Run, opts: Options, **extra) -> dict:
    m = run.summary(opts.ap)
    return {"source": "ours", "method": run.label, "dataset": run.dataset, "features": run.features, **extra,
            "mAP": 100 * m["mAP"], "top1": 100 * m["top1"], "GFLOPs/f": m["gflops_per_frame"],
            "GFLOPs/V": m["gflops_per_video"], "_run": run}


def table_report(name: str, title: str, runs: list[Run], opts: Options, select: Callable[[Run], bool],
                 extra: Callable[[Run], dict], missing: list[str], sort_key=None) -> Report:
    """A table of the selected runs (plus published rows with --paper); ``missing`` names the
    train-policy commands that would produce the runs when none is selected."""
    chosen = [r for r in runs if select(r)]
    rows = [run_row(r, opts, **extra(r)) for r in chosen]
    if sort_key:
        rows.sort(key=sort_key)
    keys = list(dict.fromkeys(k for r in rows for k in extra(r["_run"])))
    if len({r.cache for r in chosen}) > 1:  # rows of several caches (other weights, sampling): say which is which
        keys.insert(0, "cache")
        for row in rows:
            row["cache"] = cache_name(row["_run"])
    report = Report(title, ["source", "method", "dataset", "features", *keys, *METRIC_COLUMNS], rows)
    if not chosen:
        report.notes.append("no matching run; produce one with: " + " ; ".join(missing))
    else:
        report.notes.append("features: l2 = per-frame L2-normalised (LiteEval's code), none = raw pooled features "
                            "(AR-Net's heads); in parentheses, the official code's conventions a row used")
    for r in chosen:
        left = r.summary(opts.ap)["classes_without_positives"]
        if left and opts.ap == "arnet":
            report.notes.append(f"{r.path}: {left} classes without a positive count as AP 0 (--ap arnet)")
        elif left:
            report.notes.append(f"{r.path}: mAP over the classes with a positive; {left} classes left out")
    for cache in dict.fromkeys(r.cache for r in chosen):
        kinds = sorted({r.features for r in chosen if r.cache == cache})
        if len(kinds) > 1:
            report.notes.append(f"rows of {cache} mix feature normalisations ({', '.join(kinds)}): they do not "
                                "compare like with like; train them with one --set normalise=...")
    if opts.paper:
        pub = published_rows(name)
        fixed = ("source", "method", "dataset", "features", "counted", *METRIC_COLUMNS)
        report.columns = list(dict.fromkeys(report.columns[:4] + [k for p in pub for k in p if k not in fixed]
                                            + report.columns[4:] + ["counted"]))
        report.rows += pub
    report.figure = lambda fig: scatter(fig, report.rows, title)
    return report


def scatter(fig, rows: list[dict], title: str) -> None:
    """mAP against GFLOPs per video, one labelled point per row of ours."""
    ax = fig.add_subplot(111)
    ours = [r for r in rows if r["source"] == "ours" and r["GFLOPs/V"] is not None]
    for r in ours:
        ax.scatter(r["GFLOPs/V"], r["mAP"])
        ax.annotate(r["method"], (r["GFLOPs/V"], r["mAP"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GFLOPs per video")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)


COMMAND = "train-policy --method {}"


def able(capability: str) -> list[str]:
    """Registry names of the methods that declare ``capability`` (a :class:`~policy.methods.Method`
    flag such as ``stops_early``)."""
    return [name for name, cls in METHODS.items() if getattr(cls, capability)]


def can(run: Run, capability: str) -> bool:
    """Whether ``run``'s method declares ``capability``."""
    cls = METHODS.get(run.method)
    return cls is not None and getattr(cls, capability)


def first_able(runs: list[Run], capability: str, report: Report) -> Run | None:
    """The first of ``runs`` whose method declares ``capability``; ``None`` with a note on ``report``
    naming the commands that produce one."""
    chosen = [r for r in runs if can(r, capability)]
    if not chosen:
        report.notes.append(f"no run of a method that declares {capability}; produce one with: "
                            + " / ".join(COMMAND.format(m) for m in able(capability)))
        return None
    return chosen[0]


def is_baseline(run: Run) -> bool:
    cls = METHODS.get(run.method)
    return cls is not None and cls.baseline


def baseline_names() -> list[str]:
    return [name for name, cls in METHODS.items() if cls.baseline]


@register_report("table1")
def table1(runs, opts):
    """Offline recognition: LiteEval Table 1 and AR-Net Tables 1-2 in one view."""
    return table_report("table1", "Offline recognition", runs, opts, lambda r: True,
                        lambda r: {"frames/V": r.summary(opts.ap)["frames_per_video"]},
                        [COMMAND.format(m) for m in METHODS])


def _order(value) -> tuple:
    """Sort key of a cell: numbers by value, before anything else by text."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _cell(value):
    """A config value in a table cell: lists as comma lists."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def ablation_report(owner: str, ablation: Ablation) -> Callable[[list[Run], Options], Report]:
    """The report of one method's declared :class:`~policy.methods.base.Ablation`."""

    def report(runs: list[Run], opts: Options) -> Report:
        columns = ablation.columns
        sort_key = (lambda row: tuple(_order(row[c]) for c in columns)) if ablation.sort else None
        return table_report(ablation.report, ablation.title, runs, opts,
                            lambda r: r.method == owner or (ablation.references and can(r, "fixed_frames")),
                            lambda r: {c: _cell(r.config.get(key, "-")) for c, key in columns.items()},
                            [f"{COMMAND.format(owner)} {v}".strip() for v in ablation.variants], sort_key=sort_key)

    report.__doc__ = f"{ablation.title}: {METHODS[owner].display or owner} runs by {', '.join(ablation.columns)}."
    return report


for _owner, _cls in METHODS.items():
    for _ablation in _cls.__dict__.get("ablations", ()):  # declared by this class, not inherited
        register_report(_ablation.report)(ablation_report(_owner, _ablation))


@register_report("tradeoff")
def tradeoff(runs, opts):
    """mAP against GFLOPs per video for every run, the Pareto front marked."""
    report = table_report("tradeoff", "Accuracy against computation", runs, opts, lambda r: True, lambda r: {},
                          [COMMAND.format(m) for m in METHODS])
    ours = [r for r in report.rows if r["source"] == "ours"]
    for r in ours:
        r["pareto"] = not any(o["mAP"] >= r["mAP"] and o["GFLOPs/V"] <= r["GFLOPs/V"] and
                              (o["mAP"] > r["mAP"] or o["GFLOPs/V"] < r["GFLOPs/V"]) for o in ours)
    report.columns.append("pareto")
    report.rows.sort(key=lambda r: (r["source"] != "ours", r["GFLOPs/V"] if r["GFLOPs/V"] is not None else 1e9))

    def figure(fig):
        scatter(fig, report.rows, "Accuracy against computation")
        front = sorted((r for r in ours if r["pareto"]), key=lambda r: r["GFLOPs/V"])
        fig.axes[0].plot([r["GFLOPs/V"] for r in front], [r["mAP"] for r in front], "k--", label="Pareto front")
        fig.axes[0].legend()

    report.figure = figure
    return report


def _same_videos(a: Run, b: Run) -> None:
    if a.video_id != b.video_id:
        raise RunError(f"{a.path} and {b.path} were evaluated on different videos (another cache or split): "
                       f"compare runs of one cache")


@register_report("online")
def online(runs, opts):
    """LiteEval Fig. 2: top-1 against GFLOPs when a method that can stop early (``stops_early``)
    stops after its K-th expensive read (``NAME-K``), against UNIFORM-K (K frames spread over the
    first K' frames, K' where the first such method that reads frames in order stopped) and SEQ-K
    (the first K frames), both from the baseline run's per-frame scores."""
    report = Report("Online recognition with a budget of K expensive reads",
                    ["source", "curve", "K", "top1", "GFLOPs/V"])
    stopping = [r for r in runs if can(r, "stops_early")]
    every = [r for r in runs if is_baseline(r) and not r.config.get("frames", 0)]  # the baseline over every frame
    if not stopping or not every:
        needed = [(" / ".join(COMMAND.format(m) for m in able("stops_early")), stopping),
                  (" / ".join(COMMAND.format(m) + " --set frames=0" for m in baseline_names()), every)]
        report.notes.append("needs a run of a method that can stop early and a baseline run over every frame of one "
                            "cache; produce them with: " + " ; ".join(command for command, have in needed if not have))
        return report
    base = max(every, key=lambda r: float(r.gflops.mean()))  # the baseline on the expensive features
    frame_scores, base_cost = base.array(FRAME_SCORES), base.array(STEP_GFLOPS)
    labels = base.labels
    curves: dict[str, list[tuple[float, float]]] = {}

    def add(curve: str, K: int, scores: np.ndarray, spent: float) -> None:
        top1 = 100 * hit_at_k(scores.astype(np.float32), labels, 1)
        curves.setdefault(curve, []).append((spent, top1))
        report.rows.append({"source": "ours", "curve": curve, "K": K, "top1": top1, "GFLOPs/V": spent})

    def add_seq(K: int) -> None:
        add("SEQ-K", K, frame_scores[:, :K].astype(np.float32).sum(1)
            / np.minimum(K, base.codes.sampled(base.actions).sum(1))[:, None], float(base_cost[:, K - 1].mean()))

    # UNIFORM-K spreads K frames over those before where a method that reads frames in order stopped
    reference = next((r for r in stopping if r.reads_in_order), None)
    for run in stopping:
        _same_videos(run, base)  # same videos, so the same T
        steps, cost, taken = run.array(STEP_SCORES), run.array(STEP_GFLOPS), run.step_actions()
        reads = np.cumsum(run.codes.is_expensive(taken), axis=1)
        last = run.codes.sampled(taken).sum(1) - 1
        n, S = reads.shape
        rows = np.arange(n)
        for K in range(1, min(S, base_cost.shape[1]) + 1):
            hit = reads >= K
            stop = np.where(hit.any(1), hit.argmax(1), last)
            add(run.label, K, steps[rows, stop], float(cost[rows, stop].mean()))
            if run is reference:
                seen = stop + 1
                spread = numpy(spread_index(torch.from_numpy(seen), K))
                add("UNIFORM-K", K, np.take_along_axis(frame_scores, spread[:, :, None], axis=1).astype(np.float32)
                    .mean(1), float(base_cost[:, K - 1].mean()))
                add_seq(K)
    if reference is None:
        for K in range(1, base_cost.shape[1] + 1):
            add_seq(K)

    def figure(fig):
        ax = fig.add_subplot(111)
        for name, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name)
        ax.set_xlabel("GFLOPs per video")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("Online recognition")
        ax.legend(fontsize=7)

    report.figure = figure
    return report


def _class_names(run: Run) -> list[str]:
    if os.path.isfile(run.cache):
        with Cache(run.cache) as cache:
            return cache.classes
    return [str(i) for i in range(run.labels.shape[1])]


@register_report("usage")
def usage(runs, opts):
    """LiteEval Fig. 3: per class, the distribution of the fraction of sampled frames given the
    expensive features, for the first run of a method that ``spends_per_frame``."""
    report = Report("Fine-feature usage per class", ["source", "method", "class", "videos", "mean", "median",
                                                     "q1", "q3"])
    run = first_able(runs, "spends_per_frame", report)
    if run is None:
        return report
    codes = run.codes
    per_video = codes.is_expensive(run.actions).sum(1) / np.maximum(codes.sampled(run.actions).sum(1), 1)
    names, first_label = _class_names(run), run.labels.argmax(1)
    groups = {c: per_video[first_label == c] for c in np.unique(first_label)}
    for c, values in sorted(groups.items(), key=lambda kv: -kv[1].mean()):
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        report.rows.append({"source": "ours", "method": run.label, "class": names[c], "videos": len(values),
                            "mean": float(values.mean()), "median": float(median), "q1": float(q1), "q3": float(q3)})

    def figure(fig):
        ax = fig.add_subplot(111)
        order = [c for c, _ in sorted(groups.items(), key=lambda kv: -kv[1].mean())]
        ax.boxplot([groups[c] for c in order], showmeans=True)
        ax.set_xticks(range(1, len(order) + 1), [names[c] for c in order], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("fraction of frames with expensive features")
        ax.set_title(f"Fine-feature usage per class ({run.label})")
        fig.tight_layout()

    report.figure = figure
    report.figure_size = (max(8.0, 0.35 * len(groups)), 5.0)
    return report


@register_report("frames")
def frames(runs, opts):
    """LiteEval Fig. 4: the sampled frames of a few videos of the first run of a method that
    ``spends_per_frame``, each marked with what the policy did there (the run's action
    marks); the frames are read from the video files through the cache."""
    report = Report("Frames chosen by the policy", ["source", "method", "video", "actions"])
    run = first_able(runs, "spends_per_frame", report)
    if run is None:
        return report
    if not os.path.isfile(run.cache):
        raise RunError(f"{run.path}: its cache {run.cache} is gone; the frames report reads videos through it")
    picks = run.video_id[: opts.videos]
    with Cache(run.cache) as cache:
        if not cache.has_paths:
            raise RunError(f"{run.cache} holds no video paths (made by an older extract-features): re-extract it")
        row_of = {v: i for i, v in enumerate(cache.ids)}
        paths = [cache.video_path(row_of[v]) for v in picks]
        indices = [cache.frame_index(row_of[v]) for v in picks]
        decoder = cache.decoder
    codes = run.codes

    def mark(code: int) -> str:
        return codes.marks.get(code, str(code))

    for v, acts in zip(picks, run.actions[: opts.videos], strict=True):
        report.rows.append({"source": "ours", "method": run.label, "video": v,
                            "actions": " ".join(mark(int(a)) for a in acts if a != codes.padding)})
    report.notes.append("actions per sampled frame: " + ", ".join(f"{m} {codes.legend.get(c, c)}"
                                                                  for c, m in codes.marks.items()))

    def figure(fig):
        from extract.decode import frames_at, open_video

        T = run.actions.shape[1]
        expensive, visited = codes.is_expensive(run.actions), codes.is_visited(run.actions)
        jumped = codes.sampled(run.actions) & ~visited
        for row, (path, idx, acts) in enumerate(zip(paths, indices, run.actions[:len(paths)], strict=True)):
            real = idx[idx >= 0]  # the 224 x 224 crops the backbones saw
            images = frames_at(open_video(path, decoder), real).permute(0, 2, 3, 1).numpy()
            for t, image in enumerate(images):
                ax = fig.add_subplot(len(paths), T, row * T + t + 1)
                ax.imshow(image)
                ax.set_xticks([])
                ax.set_yticks([])
                colour = "lime" if expensive[row, t] else ("red" if jumped[row, t] else "none")
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3 if colour != "none" else 0)
                if visited[row, t]:
                    ax.set_title(mark(int(acts[t])), fontsize=6)
        fig.suptitle(f"{run.label}: green = expensive features, red = not read")

    report.figure = figure
    report.figure_size = (1.3 * run.actions.shape[1], 1.4 * len(paths) + 0.6)
    return report


RANDOM_DRAWS = 5
BOOTSTRAP_DRAWS = 1000  # resamples of the test videos, fewer where N x C is large (BOOTSTRAP_CELLS)
BOOTSTRAP_CELLS = 20_000_000  # draws x N x C at most (1000 on the demo; 100 on 5,000 videos of 200 classes)
MARGIN = 1.5  # mAP points: the papers' "within 1.5 points"


def random_frames_scores(reference: Run, reads: np.ndarray) -> list[np.ndarray]:
    """Scores (N, C) of picking ``reads[i]`` (at least 1, at most all) of video i's sampled frames at random, one
    in each of as many equal segments (TSN's sampling: random, but spread as any policy can spread its reads
    without looking), and averaging ``reference``'s per-frame scores over them (the baseline's frame classifier):
    a policy that does not look, with the same number of expensive reads per video. One array for each of
    ``RANDOM_DRAWS`` seeded draws."""
    frame_scores = reference.array(FRAME_SCORES).astype(np.float32)
    sampled = reference.codes.sampled(reference.actions)
    n = sampled.sum(1)
    k = np.clip(reads, 1, n)
    columns = np.argsort(~sampled, axis=1, kind="stable")  # video i's sampled frames first, in time order
    j = np.arange(sampled.shape[1])
    start, stop = (j * n[:, None]) // k[:, None], ((j + 1) * n[:, None]) // k[:, None]  # segment j of video i
    keep = j[None, :] < k[:, None]  # the first k segments of video i are its reads
    rows = np.broadcast_to(np.arange(len(n))[:, None], sampled.shape)[keep]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(RANDOM_DRAWS):
        position = np.minimum(start + (rng.random(sampled.shape) * (stop - start)).astype(int), n[:, None] - 1)
        chosen = np.zeros(sampled.shape, np.float32)
        chosen[rows, np.take_along_axis(columns, position, 1)[keep]] = 1
        draws.append((frame_scores * chosen[:, :, None]).sum(1) / k[:, None])
    return draws


@dataclass
class Lead:
    """How far A's mAP is above B's on the same test videos, in points: ``value`` as measured and the
    one-sided 95% bounds ``low`` and ``high`` (the 5th and 95th percentiles of a paired bootstrap over
    ``draws`` resamples of the videos with replacement, the same resample for A and B, seed 0; NaN when
    no resample had a positive)."""

    value: float
    low: float
    high: float
    draws: int

    def __str__(self) -> str:
        return f"{self.value:+.1f} points, 90% interval [{self.low:+.1f}, {self.high:+.1f}] ({self.draws} draws)"


def lead(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray], labels: np.ndarray, ap: str) -> Lead:
    """:class:`Lead` of scores ``a`` over scores ``b`` (each (N, C), or a list of such whose mAPs are averaged:
    random frames' draws) for multi-hot ``labels`` (N, C), with AP kind ``ap``."""
    a, b = (x if isinstance(x, list) else [x] for x in (a, b))

    def diff(rows: np.ndarray) -> float:
        score = [np.mean([mean_average_precision(s[rows], labels[rows], kind=ap)[0] for s in x]) for x in (a, b)]
        return 100 * (score[0] - score[1])

    rng = np.random.default_rng(0)
    n = len(labels)
    count = int(np.clip(BOOTSTRAP_CELLS // max(labels.size, 1), 100, BOOTSTRAP_DRAWS))
    draws = np.array([diff(rng.integers(0, n, n)) for _ in range(count)])
    draws = draws[np.isfinite(draws)]  # a resample without any positive has no mAP
    if not len(draws):
        return Lead(diff(np.arange(n)), float("nan"), float("nan"), count)
    return Lead(diff(np.arange(n)), float(np.percentile(draws, 5)), float(np.percentile(draws, 95)), count)


def run_lead(a: Run, b: Run, ap: str) -> Lead:
    """:func:`lead` of run ``a``'s mAP over run ``b``'s, refused in one line unless both saw the same videos."""
    _same_videos(a, b)
    return lead(a.scores, b.scores, a.labels, ap)


def _sweeps(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs of each method with a ``budget_knob``, grouped by everything else in their config:
    ``(method, config) -> runs`` that differ only in the knob (and their folder and run id)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        cls = METHODS.get(r.method)
        if cls is not None and cls.budget_knob:
            rest = {k: v for k, v in r.config.items() if k not in (cls.budget_knob, "out", RUN_ID)}
            groups.setdefault((r.method, repr(sorted(rest.items()))), []).append(r)
    return groups


def one_video(run: Run) -> float:
    """The points of top-1 one test video is worth in ``run``'s evaluation, 100 / N (60 videos: 1.7)."""
    return 100.0 / max(len(run.video_id), 1)


@register_report("claims")
def claims(runs, opts):
    """The demo's claims, checked on the runs: each with what was measured and whether it holds.
    An mAP comparison is judged by its :func:`lead` at 95%: a claim that one method is above another (by a
    margin) holds when the lower bound clears it; "within 1.5 points of UNIFORM" holds unless UNIFORM's lead
    is above 1.5 points at 95% (the mirror of "below": a tie is not a loss). A curve is judged on its mean
    top-1 margin, by more than one test video (:func:`one_video`)."""
    report = Report("Claims", ["source", "claim", "measured", "holds"])
    baselines = [r for r in runs if is_baseline(r)]
    uniform = max(baselines, key=lambda r: float(r.gflops.mean()), default=None)
    if uniform is None:
        report.notes.append("needs a baseline run: " + " / ".join(COMMAND.format(m) for m in baseline_names()))
        return report
    base = uniform.summary(opts.ap)
    video = one_video(uniform)
    test = f"at 95%, paired bootstrap over the {len(uniform.video_id)} test videos"

    def add(claim: str, measured: str, holds: bool) -> None:
        report.rows.append({"source": "ours", "claim": claim, "measured": measured, "holds": bool(holds)})

    for run in (r for r in runs if can(r, "claims_savings")):
        m = run.summary(opts.ap)
        behind = run_lead(uniform, run, opts.ap)
        add(f"{run.label}: mAP within {MARGIN} points of UNIFORM (UNIFORM's lead not above it {test}) at <= 55% "
            "of its GFLOPs/V", f"mAP {100 * m['mAP']:.1f} vs {100 * base['mAP']:.1f}, UNIFORM's lead {behind}; "
            f"GFLOPs/V {m['gflops_per_video']:.3f} = {100 * m['gflops_per_video'] / base['gflops_per_video']:.0f}% "
            f"of {base['gflops_per_video']:.3f}",
            behind.low <= MARGIN and m["gflops_per_video"] <= 0.55 * base["gflops_per_video"])
    cheaper = [r for r in baselines if r is not uniform]
    if cheaper:
        coarse = min(cheaper, key=lambda r: float(r.gflops.mean()))
        behind = run_lead(uniform, coarse, opts.ap)
        add(f"coarse features alone score more than {MARGIN} mAP points below UNIFORM ({test})",
            f"{100 * coarse.summary(opts.ap)['mAP']:.1f} vs {100 * base['mAP']:.1f}, UNIFORM's lead {behind}",
            behind.low > MARGIN)
    for rnd in (r for r in runs if r.config.get("match_run")):
        learned = [r for r in runs if os.path.abspath(r.path) == os.path.abspath(rnd.config["match_run"])]
        if learned:
            a, b = rnd.summary(opts.ap), learned[0].summary(opts.ap)
            ahead = run_lead(learned[0], rnd, opts.ap)
            add(f"random policy at the learned policy's budget scores more than 5 mAP points below it ({test})",
                f"random {100 * a['mAP']:.1f} at {a['gflops_per_video']:.3f} GFLOPs/V vs {learned[0].label} "
                f"{100 * b['mAP']:.1f} at {b['gflops_per_video']:.3f}, lead {ahead}", ahead.low > 5)
    every = [r for r in baselines if not r.config.get("frames", 0) and r.array(FRAME_SCORES) is not None]
    reference = max(every, key=lambda r: float(r.gflops.mean()), default=None)
    for run in (r for r in runs if can(r, "claims_beats_random")):
        claim = f"{run.label}: mAP above random frames at its budget ({test})"
        if reference is None or reference.video_id != run.video_id:
            add(claim, "needs a uniform run over every frame of its cache (its frame scores classify the random "
                "frames)", False)
            continue
        reads = run.codes.is_expensive(run.actions).sum(1)  # distinct frames given the expensive features
        chance = random_frames_scores(reference, reads)
        ahead = lead(run.scores, chance, run.labels, opts.ap)
        learned = 100 * run.summary(opts.ap)["mAP"]
        add(claim, f"mAP {learned:.1f} vs {learned - ahead.value:.1f} for {reads.mean():.2f} random frames/V "
            f"(mean of {RANDOM_DRAWS} draws, classified by {reference.label}), "
            f"lead {ahead}", ahead.low > 0)
    for (method, _), group in _sweeps(runs).items():
        if len(group) >= 2:
            cls = METHODS[method]
            knob = cls.budget_knob
            symbol = next((column for ablation in cls.ablations for column, field in ablation.columns.items()
                           if field == knob), knob)  # as the method's ablation table heads it (γ)
            points = sorted((r.config[knob], r.summary(opts.ap)["gflops_per_video"]) for r in group)
            add(f"the {symbol} sweep moves GFLOPs monotonically",
                ", ".join(f"{symbol}={g:g}: {v:.3f}" for g, v in points),
                all(a[1] < b[1] for a, b in pairwise(points)))
    curve = online(runs, opts)
    seq = sorted((r["GFLOPs/V"], r["top1"]) for r in curve.rows if r["curve"] == "SEQ-K")
    for name in dict.fromkeys(r["curve"] for r in curve.rows if r["curve"] not in ("SEQ-K", "UNIFORM-K")):
        points = [(r["GFLOPs/V"], r["top1"]) for r in curve.rows if r["curve"] == name]
        inside = [(g, t) for g, t in points if seq[0][0] <= g <= seq[-1][0]]
        margins = [t - float(np.interp(g, [s[0] for s in seq], [s[1] for s in seq])) for g, t in inside]
        add(f"online: {name} above SEQ-K at equal GFLOPs by more than one test video ({video:.1f} points) on "
            "average over its budgets", f"top-1 margin over SEQ-K (interpolated) mean {np.mean(margins):+.1f}, "
            f"min {min(margins):+.1f} points over {len(margins)} budgets" if margins else "no budget in SEQ-K's "
            "range", bool(margins) and float(np.mean(margins)) > video)
    return report


def by_cache(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs grouped by the cache they were trained on (:func:`cache_name`)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(cache_name(r), []).append(r)
    return groups


def _span(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}–{high:.{digits}f}"


@register_report("spread")
def spread(runs, opts):
    """Each method's row over several caches (the same commands on the demos of other seeds, or on
    other draws of a dataset): the min–max of its mAP, top-1 and GFLOPs/V, and in how many caches it ran."""
    groups = by_cache(runs)
    report = Report(f"Spread over {len(groups)} caches ({', '.join(groups)})",
                    ["source", "method", "caches", "mAP", "top1", "GFLOPs/V"])
    rows: dict[str, list[dict]] = {}
    for group in groups.values():
        for r in group:
            rows.setdefault(r.label, []).append(run_row(r, opts))
    for label in sorted(rows):
        found = rows[label]
        report.rows.append({"source": "ours", "method": label, "caches": len(found),
                            "mAP": _span([r["mAP"] for r in found], 2), "top1": _span([r["top1"] for r in found], 2),
                            "GFLOPs/V": _span([r["GFLOPs/V"] for r in found], 3)})
    if len(groups) < 2:
        report.notes.append("one cache: give --runs the run folders of several (DEMO_SEED=N ./demo.sh for N = 1..4)")
    return report


@register_report("verdicts")
def verdicts(runs, opts):
    """Each claim's verdict on every cache (the claims report per cache), and whether it is the same on all."""
    groups = by_cache(runs)
    report = Report(f"Claims on {len(groups)} caches", ["source", "claim", *groups, "same"])
    table: dict[str, dict[str, str]] = {}
    for name, group in groups.items():
        for row in claims(group, opts).rows:
            table.setdefault(row["claim"], {})[name] = "yes" if row["holds"] else "no"
    for claim, seen in table.items():
        report.rows.append({"source": "ours", "claim": claim, **{g: seen.get(g, "-") for g in groups},
                            "same": "yes" if len(set(seen.values())) == 1 and len(seen) == len(groups) else "no"})
    return report
