"""Report registry: the papers' tables and figures computed from run folders.

A report is a table (``columns`` x ``rows``), notes, and optionally a figure. Numbers: mAP and
top-1 in %, GFLOPs in GMACs per frame (``GFLOPs/f``, over every sampled frame, skipped ones
included) and per video (``GFLOPs/V``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import h5py
import numpy as np

from extract.metrics import hit_at_k

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


def run_row(run: Run, opts: Options, **extra) -> dict:
    m = run.metrics(opts.ap)
    return {"source": "ours", "method": run.label, "dataset": run.dataset, "features": run.features, **extra,
            "mAP": m["mAP"], "top1": m["top1"], "GFLOPs/f": m["gflops_f"], "GFLOPs/V": m["gflops_v"], "_run": run}


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
            row["cache"] = os.path.splitext(os.path.basename(row["_run"].cache))[0]
    report = Report(title, ["source", "method", "dataset", "features", *keys, *METRIC_COLUMNS], rows)
    if not chosen:
        report.notes.append("no matching run; produce one with: " + " ; ".join(missing))
    else:
        report.notes.append("features: l2 = per-frame L2-normalised (LiteEval's code), none = raw pooled features "
                            "(AR-Net's heads); in parentheses, the official code's conventions a row used")
    for r in chosen:
        left = r.metrics(opts.ap)["left_out"]
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


@register_report("table1")
def table1(runs, opts):
    """Offline recognition: LiteEval Table 1 and AR-Net Tables 1-2 in one view."""
    return table_report("table1", "Offline recognition", runs, opts, lambda r: True,
                        lambda r: {"frames/V": r.metrics(opts.ap)["frames_v"]},
                        [COMMAND.format(m) for m in ("uniform", "lstm", "liteeval-rl", "liteeval", "random",
                                                     "multiscale", "scsampler", "arnet")])


@register_report("sync")
def sync(runs, opts):
    """LiteEval Table 2: with and without synchronising the LSTMs."""
    report = table_report("sync", "Synchronising the fine LSTM with the coarse LSTM", runs, opts,
                          lambda r: r.method == "liteeval", lambda r: {"sync": r.config.get("sync", True)},
                          [COMMAND.format("liteeval"), COMMAND.format("liteeval") + " --no-sync"])
    variants = {r["sync"] for r in report.rows if r["source"] == "ours"}
    for sync_on, command in ((True, COMMAND.format("liteeval")), (False, COMMAND.format("liteeval") + " --no-sync")):
        if variants and sync_on not in variants:
            report.notes.append(f"no run with sync={sync_on}; produce one with: {command}")
    return report


@register_report("gamma")
def gamma(runs, opts):
    """LiteEval Table 3: mAP and GFLOPs per target usage gamma."""
    return table_report("gamma", "Fine-feature usage target γ", runs, opts, lambda r: r.method == "liteeval",
                        lambda r: {"γ": r.config["gamma"]},
                        [COMMAND.format("liteeval") + f" --gamma {g}" for g in (0.01, 0.03, 0.05, 0.1)],
                        sort_key=lambda row: row["γ"])


@register_report("lstm-size")
def lstm_size(runs, opts):
    """LiteEval Table 4: hidden units of the coarse (and fine) LSTM."""
    return table_report("lstm-size", "LSTM sizes", runs, opts, lambda r: r.method == "liteeval",
                        lambda r: {"cLSTM units": r.config["hidden_coarse"], "fLSTM units": r.config["hidden_fine"]},
                        [COMMAND.format("liteeval") + f" --set hidden_coarse={u}" for u in (64, 128, 256, 512)],
                        sort_key=lambda row: (row["fLSTM units"], row["cLSTM units"]))


@register_report("actions")
def actions(runs, opts):
    """AR-Net Table 4: action spaces (resolution / skip / both) against UNIFORM and LSTM."""
    return table_report("actions", "AR-Net action spaces", runs, opts,
                        lambda r: r.method in ("uniform", "lstm", "arnet"),
                        lambda r: {"actions": r.config.get("actions", "-")},
                        [COMMAND.format("arnet") + f" --set actions={a}" for a in ("resolution", "skip", "both")])


@register_report("losses")
def losses(runs, opts):
    """AR-Net Table 5: the loss terms through alpha and beta."""
    return table_report("losses", "AR-Net losses", runs, opts, lambda r: r.method == "arnet",
                        lambda r: {"α": r.config["alpha"], "β": r.config["beta"]},
                        [COMMAND.format("arnet") + f" --set alpha={a} --set beta={b}" for a, b in
                         ((0, 0), (0.1, 0), (0.1, 0.3))], sort_key=lambda row: (row["α"], row["β"]))


@register_report("stages")
def stages(runs, opts):
    """AR-Net Table 6: training stages."""
    return table_report("stages", "AR-Net training stages", runs, opts, lambda r: r.method == "arnet",
                        lambda r: {"stages": r.config["stages"]},
                        [COMMAND.format("arnet") + f" --set stages={s}" for s in
                         ("joint", "warmup,joint", "warmup,joint,finetune")])


@register_report("tradeoff")
def tradeoff(runs, opts):
    """mAP against GFLOPs per video for every run, the Pareto front marked."""
    report = table_report("tradeoff", "Accuracy against computation", runs, opts, lambda r: True, lambda r: {},
                          [COMMAND.format("uniform"), COMMAND.format("liteeval"), COMMAND.format("arnet")])
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
    """LiteEval Fig. 2: top-1 against GFLOPs when LiteEval stops after its K-th fine read
    (LiteEval-K), against UNIFORM-K (K frames spread over the first K' frames, K' where LiteEval
    stopped) and SEQ-K (the first K frames), both from the UNIFORM run's per-frame scores."""
    report = Report("Online recognition with a budget of K fine reads",
                    ["source", "curve", "K", "top1", "GFLOPs/V"])
    lite = [r for r in runs if r.method == "liteeval"]
    uniform = [r for r in runs if r.method == "uniform" and not r.config.get("frames", 0)]  # over every frame
    if not lite or not uniform:
        report.notes.append("needs a liteeval run and a uniform run over every frame of one cache; produce them with: "
                            + " ; ".join(command for command, have in ((COMMAND.format("liteeval"), lite),
                                                                       (COMMAND.format("uniform") + " --set frames=0",
                                                                        uniform)) if not have))
        return report
    base = max(uniform, key=lambda r: float(r.gflops.mean()))  # UNIFORM on the fine features
    frame_scores, base_cost = base.array("frame_scores"), base.array("step_gflops")
    labels = base.labels
    curves: dict[str, list[tuple[float, float]]] = {}

    def add(curve: str, K: int, scores: np.ndarray, spent: float) -> None:
        top1 = 100 * hit_at_k(scores.astype(np.float32), labels, 1)
        curves.setdefault(curve, []).append((spent, top1))
        report.rows.append({"source": "ours", "curve": curve, "K": K, "top1": top1, "GFLOPs/V": spent})

    for run in lite:
        _same_videos(run, base)  # same videos, so the same T
        steps, cost = run.array("step_scores"), run.array("step_gflops")
        reads = np.cumsum(run.actions == 2, axis=1)
        last = (run.actions != -1).sum(1) - 1
        n, T = reads.shape
        rows = np.arange(n)
        for K in range(1, T + 1):
            hit = reads >= K
            stop = np.where(hit.any(1), hit.argmax(1), last)
            add(run.label, K, steps[rows, stop], float(cost[rows, stop].mean()))
            if run is lite[0]:
                seen = stop + 1
                spread = np.minimum((seen[:, None] / K * (np.arange(K) + 0.5)).astype(int), seen[:, None] - 1)
                spent = float(base_cost[:, K - 1].mean())
                add("UNIFORM-K", K, np.take_along_axis(frame_scores, spread[:, :, None], axis=1).astype(np.float32)
                    .mean(1), spent)
                add("SEQ-K", K, frame_scores[:, :K].astype(np.float32).sum(1)
                    / np.minimum(K, (base.actions != -1).sum(1))[:, None], spent)

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
        with h5py.File(run.cache, "r") as f:
            return [c.decode() for c in f["classes"][:]]
    return [str(i) for i in range(run.labels.shape[1])]


@register_report("usage")
def usage(runs, opts):
    """LiteEval Fig. 3: per class, the distribution of the fraction of frames given fine features."""
    report = Report("Fine-feature usage per class", ["source", "method", "class", "videos", "mean", "median",
                                                     "q1", "q3"])
    lite = sorted((r for r in runs if r.method in ("liteeval", "liteeval-rl", "arnet")), key=lambda r: r.method == "arnet")
    if not lite:
        report.notes.append("no liteeval run; produce one with: " + COMMAND.format("liteeval"))
        return report
    run = lite[0]
    fine = 2 if run.method.startswith("liteeval") else 0
    per_video = (run.actions == fine).sum(1) / np.maximum((run.actions != -1).sum(1), 1)
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
        ax.set_ylabel("fraction of frames with fine features")
        ax.set_title(f"Fine-feature usage per class ({run.label})")
        fig.tight_layout()

    report.figure = figure
    report.figure_size = (max(8.0, 0.35 * len(groups)), 5.0)
    return report


@register_report("frames")
def frames(runs, opts):
    """LiteEval Fig. 4: the sampled frames of a few videos, those that got fine features (or each
    frame's resolution) marked; the frames are read from the video files through the cache."""
    report = Report("Frames chosen by the policy", ["source", "method", "video", "actions"])
    chosen = sorted((r for r in runs if r.method in ("liteeval", "arnet")), key=lambda r: r.method == "arnet")
    if not chosen:
        report.notes.append("no liteeval or arnet run; produce one with: " + COMMAND.format("liteeval"))
        return report
    run = chosen[0]
    if not os.path.isfile(run.cache):
        raise RunError(f"{run.path}: its cache {run.cache} is gone; the frames report reads videos through it")
    with h5py.File(run.cache, "r") as f:
        if "videos/path" not in f:
            raise RunError(f"{run.cache} holds no video paths (made by an older extract-features): re-extract it")
        row_of = {v.decode(): i for i, v in enumerate(f["videos/id"][:])}
        root = f.attrs.get("video_root", "")
        picks = run.video_id[: opts.videos]
        paths = [os.path.join(root, f["videos/path"][row_of[v]].decode()) for v in picks]
        indices = [f["videos/frame_index"][row_of[v]] for v in picks]
    legend = run.legend

    def short(code: int) -> str:  # c coarse only, F fine, 224 a resolution, s4 a skip, . skipped over
        name = legend.get(code, str(code))
        return {"coarse only": "c", "fine": "F", "skipped over": "."}.get(name, name.split("@")[-1].replace("skip ", "s"))

    for v, acts in zip(picks, run.actions[: opts.videos]):
        report.rows.append({"source": "ours", "method": run.label, "video": v,
                            "actions": " ".join(short(int(a)) for a in acts if a != -1)})
    report.notes.append("actions per sampled frame: c coarse only, F fine, 224/112/84 the resolution, "
                        "s1/s2/s4 a skip, . skipped over")

    def figure(fig):
        from extract.decode import open_reader, preprocess

        fine = 2 if run.method.startswith("liteeval") else 0
        T = run.actions.shape[1]
        for row, (path, idx, acts) in enumerate(zip(paths, indices, run.actions)):
            real = idx[idx >= 0]  # the 224 x 224 crops the backbones saw
            images = preprocess(open_reader(path).get_batch(real.tolist()).asnumpy()).permute(0, 2, 3, 1).numpy()
            for t, image in enumerate(images):
                ax = fig.add_subplot(len(paths), T, row * T + t + 1)
                ax.imshow(image)
                ax.set_xticks([])
                ax.set_yticks([])
                colour = "lime" if acts[t] == fine else ("red" if acts[t] < -1 else "none")
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3 if colour != "none" else 0)
                if run.method == "arnet" and acts[t] >= 0:
                    ax.set_title(legend.get(int(acts[t]), "").split("@")[-1], fontsize=6)
        fig.suptitle(f"{run.label}: green = fine features" + (", red = skipped" if run.method == "arnet" else ""))

    report.figure = figure
    report.figure_size = (1.3 * run.actions.shape[1], 1.4 * len(paths) + 0.6)
    return report


@register_report("claims")
def claims(runs, opts):
    """The demo's claims, checked on the runs: each with what was measured and whether it holds."""
    report = Report("Claims", ["source", "claim", "measured", "holds"])
    by = {}
    for r in runs:
        by.setdefault(r.method, []).append(r)
    uniform = max(by.get("uniform", []), key=lambda r: float(r.gflops.mean()), default=None)
    if uniform is None:
        report.notes.append("needs a uniform run: " + COMMAND.format("uniform"))
        return report
    base = uniform.metrics(opts.ap)

    def add(claim: str, measured: str, holds: bool) -> None:
        report.rows.append({"source": "ours", "claim": claim, "measured": measured, "holds": bool(holds)})

    for method in ("liteeval", "arnet"):
        for run in by.get(method, []):
            m = run.metrics(opts.ap)
            add(f"{run.label}: mAP within 1.5 points of UNIFORM at <= 55% of its GFLOPs/V",
                f"mAP {m['mAP']:.1f} vs {base['mAP']:.1f}; GFLOPs/V {m['gflops_v']:.3f} = "
                f"{100 * m['gflops_v'] / base['gflops_v']:.0f}% of {base['gflops_v']:.3f}",
                m["mAP"] >= base["mAP"] - 1.5 and m["gflops_v"] <= 0.55 * base["gflops_v"])
    coarse = [r for r in by.get("uniform", []) if r is not uniform]
    if coarse:
        m = min(coarse, key=lambda r: float(r.gflops.mean())).metrics(opts.ap)
        add("coarse features alone score >= 10 mAP points below UNIFORM",
            f"{m['mAP']:.1f} vs {base['mAP']:.1f}", m["mAP"] <= base["mAP"] - 10)
    for rnd in (r for r in by.get("random", []) if r.config.get("match_run")):
        learned = [r for r in runs if os.path.abspath(r.path) == os.path.abspath(rnd.config["match_run"])]
        if learned:
            a, b = rnd.metrics(opts.ap), learned[0].metrics(opts.ap)
            add("random policy at the learned policy's budget scores clearly (>= 5 points) below it",
                f"random {a['mAP']:.1f} at {a['gflops_v']:.3f} GFLOPs/V vs {learned[0].label} {b['mAP']:.1f} at "
                f"{b['gflops_v']:.3f}", a["mAP"] <= b["mAP"] - 5)
    lite = [r for r in by.get("liteeval", []) if r.config.get("sync", True)]
    if len(lite) >= 2:
        points = sorted((r.config["gamma"], r.metrics(opts.ap)["gflops_v"]) for r in lite)
        add("the γ sweep moves GFLOPs monotonically", ", ".join(f"γ={g:g}: {v:.3f}" for g, v in points),
            all(a[1] < b[1] for a, b in zip(points, points[1:])))
    curve = online(runs, opts)
    seq = sorted((r["GFLOPs/V"], r["top1"]) for r in curve.rows if r["curve"] == "SEQ-K")
    for name in dict.fromkeys(r["curve"] for r in curve.rows if r["curve"] not in ("SEQ-K", "UNIFORM-K")):
        points = [(r["GFLOPs/V"], r["top1"]) for r in curve.rows if r["curve"] == name]
        inside = [(g, t) for g, t in points if seq[0][0] <= g <= seq[-1][0]]
        margins = [t - float(np.interp(g, [s[0] for s in seq], [s[1] for s in seq])) for g, t in inside]
        add(f"online: {name} above SEQ-K at equal GFLOPs", f"top-1 margin over SEQ-K (interpolated) "
            f"min {min(margins):+.1f}, mean {np.mean(margins):+.1f} points over {len(margins)} budgets"
            if margins else "no budget in SEQ-K's range", bool(margins) and min(margins) > 0)
    return report
