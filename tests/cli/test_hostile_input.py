"""A harness that searches for bad input instead of listing it: hypothesis draws whole jobs, each setting from its
declared type and bounds (gdnsq.config.setting_bounds) or from a pool of hostile values (nan, inf, huge, negative,
empty, unicode, '..', control characters, very long, broken YAML), as CLI overrides or as a job file, and runs
`gdnsq train|quickstart --dry-run` in-process: validation and pre-flight, never training. For every draw:

* exit 0, or exit 2 with exactly one stderr line ``gdnsq: error: ...``;
* no exception escapes the CLI (no traceback);
* nothing is written anywhere in the sandbox, which holds the working folder, the storage folder, the inputs and
  the folders a library writes to unasked ($HOME, $XDG_CACHE_HOME, the temporary folder).

The draws are random on every run (hypothesis prints a reproducing blob on failure); 500 of them take well under
two minutes (the timing is in the test's output with ``-s``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdnsq.cli import main
from gdnsq.config import known_keys, setting_bounds, setting_type

DRAWS = int(os.environ.get("GDNSQ_HOSTILE_DRAWS", "500"))

HOSTILE = [
    "nan", "-nan", "inf", "-inf", "1e400", "-1e400", "1e-400", "-1", "0", "-0", "0.5", "1e30", "9" * 40,
    "-" + "9" * 40, "2147483648", "9223372036854775808", "1_000", "0x10", "+5", "\u0663", "\u221e", "\u00b2",
    "", " ", "  x  ", ".", "..", "../..", "../../../etc", "/", "\\", "a/b", ".hidden", "x" * 300, "x" * 5000,
    "\u6a21\u578b", "caf\u00e9", "\U0001f600", "\u202eevil", "\x00", "a\nb", "\t", "\x1b[31m", "\u2028",
    "\udcff", "null", "none", "~", "true", "false", "yes", "[1, 2", "[]", "{}", "{a: 1}", "{a: nan}", "- a",
    "&anchor x", "*alias", "!!python/object:os.system", "'quoted'", '"dq"', "%", "{{", ":", "a: b: c",
]  # fmt: skip
# Settings whose values point at the world: drawn from pools that stay in the sandbox or on 127.0.0.1 (a free-text
# host name would be a DNS lookup; a free-text absolute path could be any folder on this machine).
ADDRESSES = [
    "auto", "local", "127.0.0.1:1", "http://127.0.0.1:8265", "ray://127.0.0.1:1", "127.0.0.1:99999",
    "127.0.0.1:-1", "127.0.0.1:x", "[::1]:1", "\u6a21\u578b:1", "a" * 300 + ":1", ":", "..", "",
]  # fmt: skip
STORAGE = ["runs", "store/runs", "..", "../x", "../../x", ".", "/proc/gdnsq", "/sys/gdnsq", "/dev/null/x",
           "inputs/junk.pt/runs", "s3://bucket/runs"]  # fmt: skip
PATHS = [
    "inputs/images/train", "inputs/images/val", "inputs/oneclass/train", "inputs/junk.pt", "inputs/zero.beton",
    "inputs", "inputs/missing", ".", "..", "/proc/self/status", "/dev/null",
]  # fmt: skip
MODELS = ["gdnsq_smallcnn", "resnet18", "vit_tiny_patch16_224", "no_such_net", "resnet18.a1_in1k"]
RULES = ["[{pattern: features, target_w: 3}]", "[{pattern: '('}]", "[{pattern: nosuchlayer, skip: true}]", "[]"]
WORLD = {
    "ray.address": ADDRESSES,
    "ray.storage_path": STORAGE,
    "data.train_path": PATHS,
    "data.val_path": PATHS,
    "model.checkpoint": PATHS,
    "model.name": MODELS,
    "quant.rules": RULES,
}
KEYS = sorted(known_keys() - {"ray.enabled"})  # the executor is drawn separately; a dry run starts neither
BAD_KEYS = ["optim", "quant.budget", "quant.method_args.x.y", "nosuch", "optim.lr.x", "", ".", "name.x", "sweep.name",
            "model.name.x", "data..kind", "Optim.LR", "quant.rules[0].pattern"]  # fmt: skip


def _valid(key: str) -> st.SearchStrategy:
    """Values inside ``key``'s declared type and bounds."""
    tp, b = setting_type(key), setting_bounds(key)
    if b.choices:
        return st.sampled_from(b.choices)
    if tp is bool:
        return st.sampled_from(["true", "false"])
    if tp in (int, float):
        lo = b.ge if b.ge is not None else b.gt if b.gt is not None else -(10**6)
        hi = b.le if b.le is not None else b.lt if b.lt is not None else max(lo, 0) + 10**6
        if tp is int:
            return st.integers(int(lo) + (b.gt is not None), int(hi) - (b.lt is not None)).map(str)
        return st.floats(lo, hi, exclude_min=b.gt is not None, exclude_max=b.lt is not None, allow_nan=False).map(repr)
    if key == "quant.method_args":
        return st.sampled_from(["{}", "{error_weight: 0.1}", "{nosuch: 1}"])
    if key == "quant.method":
        return st.sampled_from(["gdnsq", "lsq", "dorefa", "pact", "pege", "codeq", "bnnpp"])
    return st.text(max_size=20)


def _value(key: str, hostile: bool) -> st.SearchStrategy:
    if key in WORLD:
        return st.sampled_from(WORLD[key])
    if not hostile:
        return _valid(key)
    return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))


DATA = st.fixed_dictionaries(
    {
        "data.kind": st.sampled_from(["imagefolder", "imagefolder", "ffcv", "bundled"]),
        "data.train_path": st.sampled_from(PATHS[:1] * 4 + PATHS),
        "data.val_path": st.sampled_from(PATHS[1:2] * 4 + PATHS),
        "data.img_size": st.sampled_from(["16", "32", "224", "1", "8192"]),
        "data.batch_size": st.sampled_from(["1", "2", "6", "7", "128"]),
    }
)
# Runs stored under the default storage folder (see _make_inputs): one readable, one torn.
STORED = ["r1", "torn"]


@st.composite
def jobs(draw) -> tuple[list[str], dict[str, str] | None]:
    """(argv, job file settings or None): a command, an executor, data (sometimes a folder of images) and 1-6
    drawn settings. A third of the jobs hold no hostile value (all inside their declared bounds: they get past
    validation and reach pre-flight, storage and the stored run's identity), a third exactly one, a third any
    number, with now and then a key that is no setting."""
    mode = draw(st.sampled_from(["clean", "one", "many"]))
    command = draw(st.sampled_from([["quickstart"], ["train"]]))
    flags = ["--dry-run"] + draw(st.sampled_from([["--no-ray"], [], ["--fresh"], ["--no-ray", "--fresh"]]))
    values = draw(DATA) if draw(st.booleans()) else {}
    chosen = draw(st.lists(st.sampled_from(KEYS + ["model.name", "name"] * 3), min_size=1, max_size=6))
    spoilt = {draw(st.sampled_from(chosen))} if mode == "one" else set(chosen) if mode == "many" else set()
    for key in chosen:
        hostile = key in spoilt and (mode == "one" or draw(st.booleans()))
        values[key] = draw(st.sampled_from(STORED)) if key == "name" and not hostile else draw(_value(key, hostile))
    if mode == "many" and draw(st.integers(0, 3)) == 0:  # a key that is no setting, or names a section or below
        values[draw(st.sampled_from(BAD_KEYS))] = draw(st.sampled_from(HOSTILE + ["1", "{lr: 0.1}"]))
    if draw(st.booleans()) and "name" not in values:
        names = STORED + (["..", "", "x" * 250] if mode == "many" else [])
        flags += ["--resume", draw(st.sampled_from(names))]
    if command == ["train"] and draw(st.booleans()):
        return command + flags + ["job.yaml"], values  # the settings go into a job file
    argv = command + flags
    for key, value in values.items():
        argv += [f"--{key}={value}"] if value.startswith("-") or draw(st.booleans()) else [f"--{key}", value]
    return argv, None


def _make_inputs(folder: Path) -> None:
    from gdnsq.data.synthetic import make_jpeg_imagefolder

    make_jpeg_imagefolder(folder / "images", classes=2, per_class=3, val_per_class=1, size=(16, 16))
    make_jpeg_imagefolder(folder / "oneclass", classes=1, per_class=2, val_per_class=1, size=(16, 16))
    (folder / "junk.pt").write_bytes(b"not a checkpoint")
    (folder / "zero.beton").write_bytes(b"")


def _store_runs(storage: Path) -> None:
    """A stored quick-start run named r1 (its config as the quick start stores it) and a torn one."""
    from gdnsq.config import load_config, to_dict
    from gdnsq.training.checkpoint import save_checkpoint

    quickstart = Path(__file__).resolve().parents[2] / "gdnsq" / "configs" / "quickstart.yaml"
    stored = to_dict(load_config(quickstart, {"name": "r1"}))
    save_checkpoint({"config": stored, "engine": {"epoch": 1, "model": {}}}, storage / "r1" / "checkpoint.pt")
    (storage / "torn").mkdir(parents=True)
    (storage / "torn" / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip")


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with what a write would change (a probe file made and removed again changes only
    its folder's mtime, which is not compared)."""
    out = {}
    for p in root.rglob("*"):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (
            st_.st_mode,
            st_.st_size if p.is_file() else None,
            st_.st_mtime_ns if p.is_file() else None,
        )
    return out


def _write_job(path: Path, values: dict[str, str]) -> None:
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):  # 'model.name.x' beside 'model.name': the level below wins
                node[part] = {}
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(nested, allow_unicode=True), encoding="utf-8", errors="surrogateescape")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """<sandbox>/a/b/work is the working folder ('..' thrice stays inside); inputs sit beside it in work/inputs;
    <sandbox>/home and <sandbox>/tmp stand in for the user's home and the temporary folder."""
    root = tmp_path_factory.mktemp("sandbox")
    work = root / "a" / "b" / "work"
    _make_inputs(work / "inputs")
    _store_runs(work / "runs")
    for place in ("home", "tmp"):
        (root / place).mkdir()
    return root, work


@pytest.mark.timeout(600)
def test_drawn_jobs_exit_0_or_2_with_one_line_and_write_nothing(sandbox, monkeypatch):
    root, work = sandbox
    monkeypatch.chdir(work)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The places a library writes to unasked (caches, config, temporary files) are inside the sandbox too, so a
    # write there is seen like one into the storage folder or the working folder.
    for var, place in (("HOME", "home"), ("XDG_CACHE_HOME", "home/.cache"), ("TMPDIR", "tmp")):
        monkeypatch.setenv(var, str(root / place))
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
    # torch makes its compile cache folder ($TMPDIR/torchinductor_$USER) when torch._dynamo is first imported (timm
    # imports it): torch's, once per process, not a run's write; imported here, before the first snapshot.
    import torch._dynamo  # noqa: F401

    tally = {0: 0, 2: 0}
    t0 = time.perf_counter()

    @settings(
        max_examples=DRAWS,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        database=None,
    )
    @given(jobs())
    def drawn(job):
        argv, job_file = job
        if job_file is not None:
            _write_job(work / "job.yaml", job_file)
        before = _snapshot(root)
        started = time.perf_counter()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: --help, or a usage error
                rc = e.code
        after = _snapshot(root)
        (work / "job.yaml").unlink(missing_ok=True)
        lines = err.getvalue().splitlines()
        assert rc in (0, 2), (argv, job_file, rc, err.getvalue())
        if rc == 2:
            assert len(lines) == 1 and lines[0].startswith("gdnsq: error: "), (argv, job_file, err.getvalue())
        assert after == before, (argv, job_file, "wrote into the sandbox")
        tally[rc] += 1
        if os.environ.get("GDNSQ_HOSTILE_LOG"):  # every draw and its outcome, for a look at what was searched
            with open(os.environ["GDNSQ_HOSTILE_LOG"], "a") as f:
                f.write(
                    repr((argv, job_file, rc, err.getvalue().strip(), round(time.perf_counter() - started, 3))) + "\n"
                )

    drawn()
    elapsed = time.perf_counter() - t0
    print(f"\n{sum(tally.values())} drawn jobs in {elapsed:.1f} s: {tally[0]} passed the checks, {tally[2]} refused")
    assert tally[0] and tally[2], tally  # the draws reach both outcomes
