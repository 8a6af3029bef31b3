"""Numbers published in the papers, quoted for ``--paper``: mAP and top-1 in %, GFLOPs as GMACs.

LiteEval (Wu et al., NeurIPS 2019) Tables 1-4 report FCVID and ActivityNet-v1.3; AR-Net (Meng et
al., ECCV 2020) Tables 1-6 report ActivityNet-v1.3, FCVID and Mini-Kinetics with 16 frames.
``None``: not reported. Each row says, in ``counted``, how its GFLOPs were counted where that
differs from ours (backbones priced once by ``torch.utils.flop_counter`` at the resolution they
run at, every sampled frame counted; see the README, "How FLOPs and mAP are counted").
"""
from __future__ import annotations

from policy.methods import METHODS

LITEEVAL = ("LiteEval's evaluate.py: 129 frames x 0.08 (MobileNetV2) + fine reads x 7.82 (ResNet-101) + "
            "its LSTM count (ptflops hooks, one gate's product per step)")
LITEEVAL_UNIFORM = "25 uniformly sampled frames x 7.82 (ResNet-101)"
ARNET = ("AR-Net's code: thop per network (4.11 for ResNet-50@224); the policy charged on visited frames, a "
         "skip's frames discounted")
ARNET_EFFICIENTNET = ("each EfficientNet charged at its native resolution (B3 at 300 px: 1.8 GFLOPs) while it "
                      "runs at 224 (0.96 by our count); values scaled from a prior table by resolution^2")
ARNET_QUOTED = "quoted by AR-Net from the method's paper or authors' code"
OWN_PAPER = "as published by the method's authors: backbones trained end to end, their own FLOPs count"
ARNET_LITEEVAL = "LiteEval's count (129-frame budget) with GFLOPs/f = GFLOPs/V / 25"
LITEEVAL_REIMPLEMENTED = ("LiteEval's re-implementation of the method; how it counted these GFLOPs is not stated (not "
                          "LiteEval's own formula: with it one ResNet-101 read alone costs 18.1 with MobileNetV2 on "
                          "129 frames)")
ARNET_PER_25 = ARNET_QUOTED + "; GFLOPs/f = GFLOPs/V / 25"
ARNET_PER_16 = ARNET_QUOTED + "; GFLOPs/f = GFLOPs/V / 16"
FRAMEEXIT_COUNT = ("FrameExit's inference.py: the mean frames read x one backbone pass, its gates, embedding and "
                   "classifiers not counted; backbone trained end to end; ")

# (report, source, method (registry name), variant, dataset, mAP, GFLOPs/f, GFLOPs/V, counted, extra columns);
# a row is shown as the method's display name with the variant in parentheses
PUBLISHED: list[tuple] = [
    *[("table1", "LiteEval Table 1", m, v, d, a, None, g, counted, {}) for m, v, d, a, g, counted in [
        ("uniform", "ResNet-101", "fcvid", 80.0, 195.5, LITEEVAL_UNIFORM),
        ("lstm", "ResNet-101", "fcvid", 79.8, 196.0, LITEEVAL_UNIFORM),
        ("frameglimpse", "", "fcvid", 71.2, 29.9, LITEEVAL_REIMPLEMENTED),
        ("fastforward", "", "fcvid", 67.6, 66.2, LITEEVAL_REIMPLEMENTED),
        ("liteeval-rl", "", "fcvid", 74.2, 245.9, LITEEVAL), ("liteeval", "", "fcvid", 80.0, 94.3, LITEEVAL),
        ("uniform", "ResNet-101", "activitynet", 70.0, 195.5, LITEEVAL_UNIFORM),
        ("lstm", "ResNet-101", "activitynet", 70.8, 195.8, LITEEVAL_UNIFORM),
        ("frameglimpse", "", "activitynet", 60.2, 32.9, LITEEVAL_REIMPLEMENTED),
        ("fastforward", "", "activitynet", 54.7, 17.2, LITEEVAL_REIMPLEMENTED),
        ("liteeval-rl", "", "activitynet", 65.2, 269.3, LITEEVAL),
        ("liteeval", "", "activitynet", 72.7, 95.1, LITEEVAL)]],
    *[("table1", "AR-Net Table 1", m, arch, d, a, f, v, ARNET if arch == "ResNet" else ARNET_EFFICIENTNET, {})
      for arch, rows in [
          ("ResNet", [("uniform", "activitynet", 72.5, 4.11, 65.76), ("lstm", "activitynet", 71.2, 4.12, 65.89),
                      ("random", "activitynet", 65.0, 1.04, 16.57),
                      ("multiscale", "activitynet", 73.5, 6.90, 110.43), ("arnet", "activitynet", 73.8, 2.09, 33.47),
                      ("uniform", "fcvid", 81.0, 4.11, 65.76), ("lstm", "fcvid", 81.1, 4.12, 65.89),
                      ("random", "fcvid", 75.3, 1.03, 16.49), ("multiscale", "fcvid", 81.3, 6.90, 110.43),
                      ("arnet", "fcvid", 81.3, 2.19, 35.12)]),
          ("EfficientNet", [("uniform", "activitynet", 78.8, 1.80, 28.80), ("lstm", "activitynet", 78.0, 1.81, 28.88),
                            ("random", "activitynet", 72.5, 0.38, 6.11),
                            ("multiscale", "activitynet", 79.5, 2.35, 37.56),
                            ("arnet", "activitynet", 79.7, 0.96, 15.29),
                            ("uniform", "fcvid", 83.5, 1.80, 28.80), ("lstm", "fcvid", 83.7, 1.81, 28.88),
                            ("random", "fcvid", 79.7, 0.38, 6.11), ("multiscale", "fcvid", 84.2, 2.35, 37.56),
                            ("arnet", "fcvid", 84.4, 0.88, 14.06)])]
      for m, d, a, f, v in rows],
    *[("table1", "AR-Net Table 2", m, variant, d, a, f, v, counted, {}) for m, variant, d, a, f, v, counted in [
        ("adaframe", "", "activitynet", 71.5, 3.16, 78.97, ARNET_PER_25),
        ("adaframe", "", "fcvid", 80.2, 3.01, 75.13, ARNET_PER_25),
        ("liteeval", "", "activitynet", 72.7, 3.80, 95.10, ARNET_LITEEVAL),
        ("liteeval", "", "fcvid", 80.0, 3.77, 94.30, ARNET_LITEEVAL),
        ("listentolook", "Image", "activitynet", 72.3, 5.09, 81.36, ARNET_PER_16),
        ("scsampler", "", "activitynet", 72.9, 2.62, 41.95, ARNET),
        ("scsampler", "", "fcvid", 81.0, 2.62, 41.95, ARNET)]],
    *[("table1", "AR-Net Table 3", m, variant, "minik", None, f, v, counted, {"top1": t})
      for m, variant, t, f, v, counted in [
          ("liteeval", "", 61.0, 3.96, 99.00, ARNET_LITEEVAL), ("scsampler", "", 70.8, 2.62, 41.95, ARNET),
          ("arnet", "ResNet", 71.7, 2.00, 32.00, ARNET),
          ("arnet", "EfficientNet", 74.8, 1.02, 16.32, ARNET_EFFICIENTNET)]],
    ("table1", "FrameExit (Ghodrati et al., CVPR 2021)", "frameexit", "ResNet-50", "activitynet", 76.1, None,
     26.1, OWN_PAPER, {}),
    ("table1", "FrameExit's official README, its released checkpoint", "frameexit", "ResNet-50", "minik", None,
     None, 19.7, FRAMEEXIT_COUNT + "4.12 (ResNet-50)", {"top1": 73.3}),
    *[("table1", "FrameExit's official README, its EfficientNet curve", "frameexit", f"EfficientNet-B3 at {g} GFLOPs",
       "activitynet", a, None, g, FRAMEEXIT_COUNT + "1.8 (EfficientNet-B3)", {})
      for a, g in [(78.6, 10.03), (79.4, 10.98), (80.9, 14.85), (81.2, 18.00)]],
    ("table1", "OCSampler (Lin et al., CVPR 2022)", "ocsampler", "K=5 of 10", "activitynet", 76.9, None, 21.7,
     OWN_PAPER + "; 5 frames x 4.12 (ResNet-50) + the sampler", {}),
    ("sync", "LiteEval Table 2", "liteeval", "w/o sync", "fcvid", 65.7, None, None, None, {}),
    ("sync", "LiteEval Table 2", "liteeval", "", "fcvid", 80.0, None, None, None, {}),
    *[("gamma", "LiteEval Table 3", "liteeval", "", "fcvid", a, None, v, LITEEVAL, {"γ": g})
      for g, a, v in [(0.01, 78.8, 75.4), (0.03, 79.7, 82.1), (0.05, 80.0, 94.3), (0.10, 80.1, 139.0)]],
    *[("lstm-size", "LiteEval Table 4", "liteeval", "", "fcvid", a, None, None, None, {"cLSTM units": u})
      for u, a in [(64, 76.9), (128, 77.3), (256, 78.3), (512, 80.0)]],
    *[("actions", "AR-Net Table 4", m, variant, "activitynet", a, f, v, ARNET, {}) for m, variant, a, f, v in [
        ("uniform", "", 72.5, 4.11, 65.76), ("lstm", "", 71.2, 4.12, 65.89),
        ("arnet", "resolution only", 73.4, 2.13, 34.08), ("arnet", "skip only", 72.7, 2.21, 34.90),
        ("arnet", "resolution + skip", 73.8, 2.09, 33.47)]],
    *[("losses", "AR-Net Table 5", "arnet", variant, "activitynet", a, f, v, ARNET, {"α": al, "β": be})
      for variant, al, be, a, f, v in [("Acc", 0.0, 0.0, 74.5, 3.75, 60.06), ("Acc+Eff", 0.1, 0.0, 73.8, 2.28, 36.48),
                                       ("Acc+Eff+Uni", 0.1, 0.3, 73.8, 2.09, 33.47)]],
    *[("stages", "AR-Net Table 6", "arnet", variant, "activitynet", a, f, v, ARNET, {"stages": variant})
      for variant, a, f, v in [("joint", 67.1, 1.16, 17.86), ("warmup,joint", 73.3, 2.03, 32.40),
                               ("warmup,joint,finetune", 73.8, 2.09, 33.47)]],
]


def display(method: str, variant: str) -> str:
    """How a published row is named: the registered method's display name and the variant in parentheses."""
    cls = METHODS[method]
    name = cls.display or cls.name
    return f"{name} ({variant})" if variant else name


def published_rows(report: str) -> list[dict]:
    """The quoted rows of ``report`` in the report's row format, labelled as published."""
    rows = []
    for name, source, method, variant, dataset, mean_ap, per_frame, per_video, counted, extra in PUBLISHED:
        if name == report:
            rows.append({"source": f"published ({source})", "method": display(method, variant), "dataset": dataset,
                         "features": None, "mAP": mean_ap, "top1": None, "GFLOPs/f": per_frame,
                         "GFLOPs/V": per_video, "counted": counted, **extra})
    return rows
