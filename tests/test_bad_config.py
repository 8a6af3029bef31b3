"""Config values of the wrong type or range, from ``--set`` or a run's ``config.json``: refused in one
line naming the key, the value and what is allowed, before anything is built from them."""
import dataclasses
import os

import click
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TOY_FLOPS
from extract.cache import write_cache
from extract.flops import FlopsEntry
from extract.options import apply_overrides, parse_value
from policy.cli import main as train_policy
from policy.methods import METHODS, check_config


@pytest.mark.parametrize("word", ["1", "true", "YES", "On", "0", "false", "No", "OFF"])
def test_a_bool_takes_eight_words(word):
    assert parse_value(bool, word) is (word.lower() in ("1", "true", "yes", "on"))


@pytest.mark.parametrize("word", ["maybe", "nope", "2", "", "t"])
def test_any_other_bool_is_refused_in_one_line(word):
    """Today ``sync=nope`` silently read as false."""
    cfg = METHODS["liteeval"].Config(method="liteeval")
    with pytest.raises(click.UsageError) as err:
        apply_overrides(cfg, (f"sync={word}",))
    assert err.value.message == (f"--set sync={word}: {word!r} is not a bool: write one of 1/true/yes/on or "
                                 "0/false/no/off")
    assert cfg.sync is True


@pytest.mark.parametrize("text", ["1e9", "2.5", "ten"])
def test_an_int_not_written_in_digits_is_refused_in_one_line(text):
    with pytest.raises(click.UsageError, match=rf"--set hidden_fine={text}: '{text}' is not an int: write a whole "
                                               r"number in digits \(1000000000, not 1e9\)$"):
        apply_overrides(METHODS["liteeval"].Config(method="liteeval"), (f"hidden_fine={text}",))


def resolved(method: str, **changes):
    cls = METHODS[method]
    return dataclasses.replace(cls.resolve(cls.Config(method=method), TOY_FLOPS, {"num_frames": 16}), **changes)


BAD = [  # method, key, value (as config.json or a caller could hold it), what the line says is allowed
    ("liteeval", "sync", "no", "true or false"),
    ("liteeval", "sync", 1, "true or false"),
    ("liteeval", "hidden_fine", 1e9, "an int in [1, 16384]"),
    ("liteeval", "hidden_fine", 10 ** 9, "an int in [1, 16384]"),
    ("liteeval", "hidden_coarse", 0, "an int in [1, 16384]"),
    ("liteeval", "gamma", float("nan"), "a finite number in [0, 1]"),
    ("liteeval", "gamma", 1.5, "a finite number in [0, 1]"),
    ("liteeval", "lam", "2", "a finite number in [0, inf)"),
    ("liteeval", "tau_end", 0.0, "a finite number in (0, inf)"),
    ("liteeval", "lr", float("inf"), "a finite number in [0, inf)"),
    ("liteeval", "batch_size", -1, "an int in [1, 1048576]"),
    ("liteeval", "epochs", True, "an int in [1, 100000]"),
    ("liteeval", "val_fraction", 1.0, "a finite number in [0, 0.9]"),
    ("liteeval", "seed", -1, "an int in [0, 4294967295]"),
    ("liteeval", "select_on", "test", "one of val, eval"),
    ("liteeval", "fine", 3, "a str"),
    ("arnet", "skips", (1, "2"), "a tuple, each item an int in [1, 65536]"),
    ("arnet", "skips", (0,), "a tuple, each item an int in [1, 65536]"),
    ("arnet", "stages", "joint", "a tuple, each item a str"),
    ("arnet", "momentum", 1.5, "a finite number in [0, 1]"),
    ("arnet", "optim", "rmsprop", "one of sgd, adam"),
    ("adaframe", "steps", 100000, "an int in [1, 65536]"),
    ("multiagent", "move", -0.1, "a finite number in [0, 1]"),
    ("frameglimpse", "sigma", 0, "a finite number in (0, inf)"),
    ("uniform", "frames", -2, "an int in [0, 65536]"),
]


@pytest.mark.parametrize("method,key,value,allowed", BAD, ids=[f"{m}-{k}={v!r}" for m, k, v, _ in BAD])
def test_a_value_of_the_wrong_type_or_range_is_refused_in_one_line(method, key, value, allowed):
    """Today only the string options' choices were checked: ``sync="no"`` read as true, and
    ``hidden_fine=1e9`` went on to build (16 GiB in recognize before failing)."""
    with pytest.raises(ValueError) as err:
        check_config(resolved(method, **{key: value}))
    assert str(err.value) == f"{key}={value!r}: {key} must be {allowed}"


def test_the_edges_of_the_ranges_are_allowed():
    check_config(resolved("liteeval", hidden_coarse=1, hidden_fine=16384, gamma=0, lam=0, lr=0, val_fraction=0.9,
                          seed=4294967295, batch_size=1, checkpoint_steps=0, weight_decay=3))
    check_config(resolved("uniform", frames=0, val_fraction=0, memory_budget_gb=0.5))
    check_config(resolved("arnet", momentum=1, alpha=1, skips=(1, 65536), stages=("joint",)))


@pytest.fixture
def toy_cache(tmp_path):
    path = str(tmp_path / "toy.h5")
    n, steps = 12, 4
    entries = [FlopsEntry(name, 8, gflops, 1, 5) for name, gflops in TOY_FLOPS.items()]
    rng = np.random.default_rng(0)
    write_cache(path, dataset="toy", sampling={"num_frames": steps}, classes=["a", "b", "c"],
                ids=[str(i) for i in range(n)], splits=["train"] * 8 + ["test"] * 4,
                labels=np.eye(3, dtype=np.uint8)[np.arange(n) % 3], length=np.full(n, steps),
                frame_index=np.tile(np.arange(steps), (n, 1)), flops=entries,
                features={e.name: rng.standard_normal((n, steps, e.dim)).astype(np.float16) for e in entries})
    return path


@pytest.mark.parametrize("args,line", [
    (["--lr", "nan"], "lr=nan: lr must be a finite number in [0, inf)"),
    (["--set", "gamma=1.5"], "gamma=1.5: gamma must be a finite number in [0, 1]"),
    (["--set", "hidden_fine=100000"], "hidden_fine=100000: hidden_fine must be an int in [1, 16384]"),
])
def test_train_policy_refuses_a_value_out_of_range_before_writing_anything(toy_cache, tmp_path, args, line):
    """Today ``--lr nan`` trained and wrote a run of NaN scores."""
    out = tmp_path / "run"
    result = CliRunner().invoke(train_policy, ["--method", "liteeval", "--features", toy_cache, "--out", str(out),
                                               "--epochs", "1", "--device", "cpu", "--no-progress", *args])
    assert result.exit_code == 1 and result.output == f"Error: {line}\n"
    assert not os.path.exists(out)
