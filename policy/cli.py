"""``train-policy``: train a method on a feature cache and write a run folder."""
from __future__ import annotations

import glob
import hashlib
import os
import re

import click

from extract.cache import Cache
from extract.errors import UserError
from extract.options import apply_overrides

from .methods import METHODS
from .train import train

DATA = "data"


def _holds_videos(path: str) -> bool:
    """Whether ``path`` is a readable cache with at least one video (a run where every video failed
    leaves an empty one)."""
    try:
        with Cache(path) as cache:
            return len(cache.ids) > 0
    except (OSError, KeyError):
        return False


def default_cache() -> str:
    """The newest ``data/features/*.h5`` holding videos (the folder ``extract-features`` writes to by
    default), named in one line."""
    caches = sorted(glob.glob(os.path.join(DATA, "features", "*.h5")), key=os.path.getmtime)
    caches = [c for c in caches if _holds_videos(c)]
    if not caches:
        raise click.UsageError("no --features given and no cache with videos in data/features/: "
                               "run extract-features first")
    others = f"; {len(caches) - 1} other(s) there, pick one with --features" if len(caches) > 1 else ""
    click.echo(f"using {caches[-1]}, the newest cache in {os.path.join(DATA, 'features')}{others}", err=True)
    return caches[-1]


def as_text(value: object) -> str:
    """A config value as it is written after ``--set``: tuples as comma lists."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def folder_name(value: object, limit: int = 64) -> str:
    """``value`` as one path component: characters other than letters, digits and ``._+-`` become
    ``-`` (a path's separators included); past ``limit`` characters, a hash of the whole value ends it."""
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-.")
    if len(text) > limit:
        text = text[: limit - 9] + "-" + hashlib.sha1(str(value).encode()).hexdigest()[:8]
    return text


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""\b
Examples:
  train-policy --method liteeval --gamma 0.05
  train-policy --method uniform --features data/features/fcvid_fps1-max129.h5
  train-policy --method liteeval --no-sync --set hidden_coarse=64 --set hidden_fine=512
  torchrun --standalone --nproc_per_node 4 -m policy.cli --method liteeval
""")
@click.option("--method", type=click.Choice(sorted(METHODS)), required=True)
@click.option("--features", metavar="CACHE.h5", help="Feature cache. Default: the newest data/features/*.h5.")
@click.option("--out", metavar="RUN_DIR", help="Run folder. Default: data/runs/<cache name>/<method>[_<option>=<value>"
              "...], naming every option given (and --seed unless 0).")
@click.option("--gamma", type=float, help="LiteEval: target fine-feature usage (default 0.05).")
@click.option("--no-sync", is_flag=True, help="LiteEval: no cLSTM -> fLSTM synchronisation (Table 2).")
@click.option("--stochastic-eval", is_flag=True,
              help="LiteEval, AR-Net: sample the gate / actions at evaluation (the official codes) instead of argmax.")
@click.option("--epochs", type=click.IntRange(1))
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--lr", type=float)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same numbers (on CPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config field (see config.json of a run), e.g. --set hidden_fine=512.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch (same settings; "
              "--epochs may grow).")
@click.option("--force", is_flag=True, help="Replace the run already in --out (refused without it).")
@click.option("--no-progress", is_flag=True)
def main(method, features, out, gamma, no_sync, stochastic_eval, epochs, batch_size, lr, seed, device, sets, resume,
         force, no_progress) -> None:
    """Train a gating policy or baseline on cached per-frame features and write a run folder
    (config.json, model.pt, train_log.csv, metrics.json, predictions.h5)."""
    cfg = METHODS[method].Config(method=method, seed=seed, device=device)
    named = {"gamma": gamma, "epochs": epochs, "batch_size": batch_size, "lr": lr}
    pairs = tuple(f"{k}={v}" for k, v in named.items() if v is not None) + tuple(sets)
    pairs += ("sync=false",) if no_sync else ()
    pairs += ("stochastic_eval=true",) if stochastic_eval else ()
    keys = apply_overrides(cfg, pairs)
    cfg.features = features or default_cache()
    named_keys = [k for k in keys if k not in ("device", "memory_budget_gb")] + (["seed"] if seed else [])
    suffix = "".join(f"_{k}={folder_name(as_text(getattr(cfg, k)))}" for k in dict.fromkeys(named_keys))
    stem = os.path.splitext(os.path.basename(cfg.features))[0]
    cfg.out = out or os.path.join(DATA, "runs", stem, method + suffix)
    try:
        metrics = train(cfg, resume=resume, force=force, progress=not no_progress)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{cfg.out}: mAP {metrics['mAP']:.4f}, top-1 {metrics['top1']:.4f}, "
                   f"{metrics['gflops_per_video']:.3f} GFLOPs/video, fine usage {metrics['fine_usage']:.3f} "
                   f"on {metrics['videos']} videos")


if __name__ == "__main__":
    main()
