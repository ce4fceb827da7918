"""Hostile input to the online surfaces, through the CLI on tiny models (issue 25): torn metrics lines,
runaway counts, poisoned or damaged files, user rewards that raise, ``--out`` naming a file, and the
same bytes in every file of a run (same seed; killed and resumed).

Every refusal ends with exit code 2, one ``qvlm ...: error:`` line on stderr and no traceback; where the
issue says "before any work", the model must not load (``qvlm.loading.load_model`` is replaced by one
that fails the test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qvlm.loading
from qvlm.cli import main
from qvlm.train import metrics as metrics_module
from qvlm.train.checkpoint import has_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# wall-clock fields of metrics.jsonl: the only values two identical runs may write differently (README)
TIMING_KEYS = ("charts/tokens_per_s",)

PPO = ["--iterations", "3", "--prompts-per-iter", "2", "--responses-per-prompt", "2", "--max-new-tokens", "4",
       "--no-chat", "--no-progress", "--checkpoint-every", "1"]  # fmt: skip
SOFTQ = ["--rounds", "3", "--prompts-per-round", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
         "--steps-per-round", "2", "--batch-size", "4", "--head-hidden", "8", "--no-progress"]  # fmt: skip
OFFLINE = ["--steps", "4", "--batch-size", "4", "--head-hidden", "8", "--checkpoint-every", "1", "--max-length", "32",
           "--no-progress"]  # fmt: skip
RM = ["--epochs", "2", "--batch-size", "2", "--checkpoint-every", "1", "--held-out", "0.25", "--no-progress"]

USER_REWARDS = """
calls = []


def ok(prompts, responses):
    return [float(len(r)) for r in responses]


def boom(prompts, responses):
    return [1 / 0 for r in responses]


def second_call_fails(prompts, responses):  # the first rollout scores, the second raises
    calls.append(1)
    if len(calls) >= 2:
        raise KeyError("no-such-key")
    return [float(len(r)) for r in responses]


def huge(prompts, responses):
    return [10 ** 400 for r in responses]


def exits(prompts, responses):
    raise SystemExit(3)


def deep(prompts, responses):
    import json

    return [json.loads("{") for r in responses]
"""


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    """The tiny model, prompts, samples, labelled texts, a tiny backbone, user rewards, and a PPO run."""
    from tests.helpers import save_tiny_backbone

    root = tmp_path_factory.mktemp("hardening")
    (root / "p.txt").write_text("hello\nthe cat\nabc\n")
    (root / "refs.jsonl").write_text('{"prompt": "hello", "reference": "hello there"}\n')
    pairs = [("ab", "cde"), ("cd", "eee"), ("ef", "ab"), ("gh", "ae"), ("ab", "b"), ("cd", "ee"), ("ef", "x")]
    rows = [{"prompt": p, "response": r, "reward": float(i % 3)} for i, (p, r) in enumerate(pairs)]
    (root / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [("good day", "pos"), ("bad day", "neg"), ("fine", "pos"), ("awful", "neg"), ("nice", "pos"),
             ("sad", "neg"), ("great", "pos"), ("poor", "neg")]  # fmt: skip
    (root / "rm.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in texts))
    (root / "rewards.py").write_text(USER_REWARDS)
    backbone = save_tiny_backbone(root / "backbone", "llama")
    ws = {"root": root, "model": str(tiny_dir), "backbone": str(backbone)}
    code, _, err = run_cli(_ppo(ws, root / "ppo"), None)
    assert code == 0, err
    return ws


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``qvlm argv`` in-process: (exit code, stdout, stderr). Any exception escaping main fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv, capsys, *needles: str) -> str:
    """Run ``argv``: exit 2, exactly one ``qvlm ... error:`` line, no traceback, the needles in it."""
    code, _, err = run_cli(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("qvlm") and "error:" in line]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    assert "[errno" not in errors[0].lower(), errors[0]  # the OS's words alone say nothing of what to do
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model (or the demo, or the proxy's work) starts loading."""

    def loading(*args, **kwargs):
        raise AssertionError("a model loaded: the input was not refused before the work")

    from qvlm.apps import demo

    monkeypatch.setattr(qvlm.loading, "load_model", loading)
    monkeypatch.setattr(demo, "run_demo", loading)


def _ppo(ws, out, *extra, reward="count:e"):
    return ["train", "ppo", "--model", ws["model"], "--prompts", ws["root"] / "p.txt", "--reward", reward,
            "--out", out, *PPO, *extra]  # fmt: skip


def _softq(ws, out, *extra, reward="count:e"):
    return ["train", "softq", "--model", ws["model"], "--prompts", ws["root"] / "p.txt", "--reward", reward,
            "--out", out, *SOFTQ, *extra]  # fmt: skip


def _offline(ws, algo, out, *extra):
    return ["train", algo, "--model", ws["model"], "--data", ws["root"] / "s.jsonl", "--out", out, *OFFLINE, *extra]


def _rm(ws, out, *extra, data=None):
    return ["train", "rm", "--data", data or ws["root"] / "rm.jsonl", "--backbone", ws["backbone"], "--out", out,
            *RM, *extra]  # fmt: skip


def _eval(ws, *extra, reward="count:e", prompts=None):
    return ["eval", "--model", ws["model"], "--prompts", prompts or ws["root"] / "p.txt", "--reward", reward,
            "--betas", "0", "--max-new-tokens", "4", "--no-chat", *extra]  # fmt: skip


def _gen(ws, *extra):
    return ["generate", "--model", ws["model"], "--prompt", "ab", "--max-new-tokens", "4", *extra]


def _sample(ws, tmp_path, *extra, reward="count:e"):
    return ["sample", "--model", ws["model"], "--prompts", ws["root"] / "p.txt", "--reward", reward,
            "--max-new-tokens", "4", "--n", "2", "--out", tmp_path / "s.jsonl", *extra]  # fmt: skip


def _proxy(ws, out, *extra):
    return ["proxy", "--out", out, "--model", ws["model"], "--backbone", ws["model"], "--train-prompts", "6",
            "--samples-per-prompt", "4", "--eval-prompts", "2", "--max-new-tokens", "6", *extra]  # fmt: skip


TRAINERS = {
    "ppo": lambda ws, out: _ppo(ws, out),
    "ppo-full": lambda ws, out: _ppo(ws, out, "--trunk", "full", "--critic", "separate", "--lr", "1e-3"),
    "softq": lambda ws, out: _softq(ws, out),
    "ilql": lambda ws, out: _offline(ws, "ilql", out),
    "value": lambda ws, out: _offline(ws, "value", out, "--with-q"),
    "rm": lambda ws, out: _rm(ws, out),
}


def _killed(argv, monkeypatch, capsys) -> None:
    """Run ``argv`` and kill it (KeyboardInterrupt, as Ctrl-C) right after the first metrics line written
    after its first checkpoint: a run interrupted with a checkpoint to resume and lines past it."""
    real = metrics_module.MetricsLogger.log

    def log_then_die(self, step, values):
        real(self, step, values)
        if self.file is not None and has_checkpoint(Path(self.file.name).parent):
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics_module.MetricsLogger, "log", log_then_die)
    code, _, err = run_cli(argv, capsys)
    monkeypatch.setattr(metrics_module.MetricsLogger, "log", real)
    assert code == 130, err


def _run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory by relative path, except what README says may differ: TensorBoard
    event files (wall-clock times in them and in their names), and metrics.jsonl's wall-clock fields."""
    files = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if not p.is_file() or rel.startswith("tb/"):
            continue
        files[rel] = p.read_bytes()
    rows = [json.loads(line) for line in files.pop("metrics.jsonl").decode().splitlines()]
    files["metrics.jsonl"] = json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]).encode()
    return files


def _differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- torn metrics lines


@pytest.mark.parametrize("trainer", ["ppo", "softq", "value", "rm"])
def test_resume_drops_a_torn_metrics_line_with_a_warning(trainer, ws, tmp_path, monkeypatch, capsys):
    """A run killed while appending to metrics.jsonl leaves half a line; --resume drops it, says so, and
    continues to the uninterrupted run's metrics."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(TRAINERS[trainer](ws, whole), capsys)[0] == 0
    _killed(TRAINERS[trainer](ws, cut), monkeypatch, capsys)
    with (cut / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 2, "losses/v": 0.12')  # the kill fell inside this write
    code, _, err = run_cli([*TRAINERS[trainer](ws, cut), "--resume"], capsys)
    assert code == 0, err
    assert "warning" in err and "torn last line" in err and "metrics.jsonl" in err, err
    assert _run_files(cut)["metrics.jsonl"] == _run_files(whole)["metrics.jsonl"]


def test_resume_drops_a_torn_line_of_nul_bytes(ws, tmp_path, monkeypatch, capsys):
    """A crash can leave the file's new length filled with NUL bytes instead of the line: dropped too."""
    run = tmp_path / "run"
    _killed(TRAINERS["value"](ws, run), monkeypatch, capsys)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"\x00" * 40)
    code, _, err = run_cli([*TRAINERS["value"](ws, run), "--resume"], capsys)
    assert code == 0 and "torn last line" in err, err
    assert all(json.loads(line)["step"] >= 0 for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_damaged_metrics_line_before_the_last_is_one_line(ws, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _killed(TRAINERS["value"](ws, run), monkeypatch, capsys)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{not json", *lines]) + "\n")
    refused([*TRAINERS["value"](ws, run), "--resume"], capsys, "metrics.jsonl:1", "delete")


# ----------------------------------------------------------------------------- same seed, same bytes


@pytest.mark.parametrize("trainer", ["ppo", "ppo-full", "softq", "ilql", "value", "rm"])
def test_same_seed_and_a_resumed_run_write_the_same_bytes(trainer, ws, tmp_path, monkeypatch, capsys):
    """Two runs with one seed, and a run killed after its first checkpoint then resumed, write the same
    bytes in every file (checkpoints included), except what README lists: TensorBoard event files and
    metrics.jsonl's wall-clock fields."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for run in (a, b):
        code, _, err = run_cli(TRAINERS[trainer](ws, run), capsys)
        assert code == 0, err
    _killed(TRAINERS[trainer](ws, c), monkeypatch, capsys)
    torch.manual_seed(12345)  # a resumed process starts with other random states
    code, _, err = run_cli([*TRAINERS[trainer](ws, c), "--resume"], capsys)
    assert code == 0, err
    first = _run_files(a)
    assert any(k.startswith("checkpoint/") for k in first) and "metrics.jsonl" in first
    assert _differing(first, _run_files(b)) == []
    assert _differing(first, _run_files(c)) == []


def test_adapter_config_lists_target_modules_sorted(ws):
    """peft writes target_modules from a set, whose order changes with each process's string hashing:
    sorted, another process with the same seed writes the same adapter_config.json."""
    config = json.loads((ws["root"] / "ppo" / "adapter" / "adapter_config.json").read_text())
    modules = config["target_modules"]
    assert len(modules) > 4 and modules == sorted(modules)


# ----------------------------------------------------------------------------- runaway work

RUNAWAY = [
    ("eval-best-of", lambda ws, t: _eval(ws, "--best-of", "100000000"), "--best-of"),
    ("eval-best-of-list", lambda ws, t: _eval(ws, "--best-of", "1,2,100000000"), "--best-of"),
    ("eval-samples-per-prompt", lambda ws, t: _eval(ws, "--samples-per-prompt", "1000000000"), "--samples-per-prompt"),
    ("eval-samples-x-prompts", lambda ws, t: _eval(ws, "--samples-per-prompt", "400000"), "1,200,000"),
    ("eval-best-of-x-prompts", lambda ws, t: _eval(ws, "--best-of", "1,400000"), "1,200,003"),
    ("eval-max-new-tokens", lambda ws, t: _eval(ws, "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    ("generate-max-new-tokens", lambda ws, t: _gen(ws, "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    ("sample-max-new-tokens", lambda ws, t: _sample(ws, t, "--max-new-tokens", "10000000000"), "--max-new-tokens"),
    ("ppo-responses", lambda ws, t: _ppo(ws, t / "r", "--responses-per-prompt", "1000000000"), "--responses-per"),
    ("ppo-prompts", lambda ws, t: _ppo(ws, t / "r", "--prompts-per-iter", "1000000000"), "--prompts-per-iter"),
    ("ppo-iterations", lambda ws, t: _ppo(ws, t / "r", "--iterations", "1000000000"), "--iterations"),
    ("ppo-max-new-tokens", lambda ws, t: _ppo(ws, t / "r", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    ("softq-samples", lambda ws, t: _softq(ws, t / "r", "--samples-per-prompt", "1000000000"), "--samples-per"),
    ("softq-prompts", lambda ws, t: _softq(ws, t / "r", "--prompts-per-round", "1000000000"), "--prompts-per-round"),
    ("softq-rounds", lambda ws, t: _softq(ws, t / "r", "--rounds", "1000000000"), "--rounds"),
    ("softq-batch-size", lambda ws, t: _softq(ws, t / "r", "--batch-size", "1000000000"), "--batch-size"),
    ("softq-max-new-tokens", lambda ws, t: _softq(ws, t / "r", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    ("proxy-max-n", lambda ws, t: _proxy(ws, t / "r", "--max-n", "100000000"), "--max-n"),
    ("proxy-samples", lambda ws, t: _proxy(ws, t / "r", "--samples-per-prompt", "1000000000"), "--samples-per"),
    ("proxy-pairs", lambda ws, t: _proxy(ws, t / "r", "--samples-per-prompt", "5000"), "pairs"),
    ("proxy-max-new-tokens", lambda ws, t: _proxy(ws, t / "r", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    ("proxy-ppo", lambda ws, t: _proxy(ws, t / "r", "--ppo-iterations", "1,100000000"), "--ppo-iterations"),
    ("demo-best-of", lambda ws, t: ["demo", "--out", t / "d", "--best-of", "1000000000"], "--best-of"),
    ("demo-max-new-tokens", lambda ws, t: ["demo", "--out", t / "d", "--max-new-tokens", "1000000000"], "--max-new"),
    # layers whose weights are allocated at once
    ("ilql-head-hidden", lambda ws, t: _offline(ws, "ilql", t / "r", "--head-hidden", "1000000000"), "--head-hidden"),
    ("value-head-hidden", lambda ws, t: _offline(ws, "value", t / "r", "--head-hidden", "1000000000"), "--head-hidden"),
    ("softq-head-hidden", lambda ws, t: _softq(ws, t / "r", "--head-hidden", "1000000000"), "--head-hidden"),
    ("ppo-head-hidden", lambda ws, t: _ppo(ws, t / "r", "--head-hidden", "1000000000"), "--head-hidden"),
    ("ppo-lora-r", lambda ws, t: _ppo(ws, t / "r", "--lora-r", "1000000000"), "--lora-r"),
    ("demo-head-hidden", lambda ws, t: ["demo", "--out", t / "d", "--head-hidden", "1000000000"], "--head-hidden"),
    # a weight beyond float range (1e999 parses as inf): refused when the reward spec is read
    ("reward-weight-ppo", lambda ws, t: _ppo(ws, t / "r", reward="1e999*length"), "1e999"),
    ("reward-weight-softq", lambda ws, t: _softq(ws, t / "r", reward="count:e+-1e999*length"), "-1e999"),
    ("reward-weight-eval", lambda ws, t: _eval(ws, reward="vader+1e400*count:e"), "1e400"),
    ("reward-weight-sample", lambda ws, t: _sample(ws, t, reward="1e999*length"), "1e999"),
    ("reward-weight-proxy", lambda ws, t: _proxy(ws, t / "r", "--gold", "1e999*length"), "1e999"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in RUNAWAY], ids=[c[0] for c in RUNAWAY])
def test_runaway_work_is_refused_before_any_model_loads(build, needle, ws, tmp_path, capsys, no_model):
    refused(build(ws, tmp_path), capsys, needle)
    assert not (tmp_path / "r" / "checkpoint").exists()


# ----------------------------------------------------------------------------- bad files


def _policy_copy(ws, tmp_path) -> Path:
    dst = tmp_path / "policy"
    shutil.copytree(ws["root"] / "ppo", dst)
    return dst


def _nan_first(f: Path) -> None:
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(f))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _full_policy_with_nan(ws, tmp_path) -> Path:
    """A run directory of a full-trunk PPO policy (policy.safetensors) whose weights hold a NaN."""
    from tests.helpers import tiny_model

    run = tmp_path / "full"
    run.mkdir()
    model, _ = tiny_model("llama", seed=0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(run / "policy.safetensors"))
    (run / "training.json").write_text(json.dumps({"algorithm": "ppo", "trunk": "full"}))
    return run


ADAPTER = "adapter/adapter_model.safetensors"
BAD_POLICIES = [
    ("nan-adapter", lambda p: _nan_first(p / ADAPTER), "not finite"),
    ("truncated-adapter", lambda p: _truncate(p / ADAPTER), "adapter_model.safetensors"),
    ("empty-adapter", lambda p: (p / ADAPTER).write_bytes(b""), "adapter_model.safetensors"),
    ("damaged-training-json", lambda p: (p / "training.json").write_text('{"algorithm": "ppo", "con'), "training.json"),
    ("training-json-list", lambda p: (p / "training.json").write_text("[1, 2]"), "training.json"),
    ("training-json-binary", lambda p: (p / "training.json").write_bytes(b"\xff\xfe\x00"), "training.json"),
    ("damaged-adapter-config", lambda p: (p / "adapter/adapter_config.json").write_text("{"), "adapter_config.json"),
]


@pytest.mark.parametrize("mutate,needle", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_bad_policy_is_refused_on_load(command, mutate, needle, ws, tmp_path, capsys):
    policy = _policy_copy(ws, tmp_path)
    mutate(policy)
    argv = _gen(ws, "--policy", policy) if command == "generate" else _eval(ws, "--policy", policy)
    refused(argv, capsys, needle)


def test_a_full_policy_with_a_nan_weight_is_refused_on_load(ws, tmp_path, capsys):
    refused(_gen(ws, "--policy", _full_policy_with_nan(ws, tmp_path)), capsys, "policy.safetensors", "not finite")


def _model_copy(ws, tmp_path, mutate) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(ws["model"], dst)
    mutate(dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "mutate,needle", [(_truncate, "damaged"), (_nan_first, "not finite")], ids=["truncated", "nan"]
)
def test_a_model_with_damaged_or_nan_weights_is_one_line(mutate, needle, ws, tmp_path, capsys):
    model = _model_copy(ws, tmp_path, mutate)
    refused(["generate", "--model", model, "--prompt", "ab", "--max-new-tokens", "4"], capsys, needle)


@pytest.mark.parametrize(
    "mutate,needle", [(_truncate, "damaged"), (_nan_first, "not finite")], ids=["truncated", "nan"]
)
def test_a_classifier_reward_with_damaged_or_nan_weights_is_one_line(mutate, needle, ws, tmp_path, capsys):
    """``--reward hf:DIR``: the classifier's weights are checked when it loads (not as NaN scores later)."""
    clf = tmp_path / "clf"
    assert run_cli(_rm(ws, clf), capsys)[0] == 0
    mutate(clf / "model.safetensors")
    refused(_eval(ws, reward=f"hf:{clf}:pos"), capsys, needle)


def test_a_damaged_checkpoint_pointer_resumes_from_the_newest_checkpoint(ws, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _killed(TRAINERS["value"](ws, run), monkeypatch, capsys)
    (run / "checkpoint" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run_cli([*TRAINERS["value"](ws, run), "--resume"], capsys)
    assert code == 0, err


def test_damaged_cached_results_of_the_proxy_are_one_line(ws, tmp_path, capsys, no_model):
    out = tmp_path / "proxy"
    out.mkdir()
    (out / "config.json").write_text('{"gold": "vader", "train_')
    refused(_proxy(ws, out), capsys, "config.json", "delete it")


# ----------------------------------------------------------------------------- train rm data


@pytest.mark.parametrize(
    "data,needle",
    [
        (b'{"text": "a", "label": 1}\n{"text": "\xff\xfe", "label": 0}\n', "rm.jsonl:2"),
        (b'{"text": "a", "label": 1}\n{"text": "b", "label": ' + b"9" * 5000 + b"}\n", "rm.jsonl:2"),
    ],
    ids=["invalid-utf8", "label-of-5000-digits"],
)
def test_rm_data_that_is_not_text_is_one_line(data, needle, ws, tmp_path, capsys, no_model):
    path = tmp_path / "rm.jsonl"
    path.write_bytes(data)
    refused(_rm(ws, tmp_path / "out", data=path), capsys, needle)


def test_rm_labels_that_look_numeric_are_names(ws, tmp_path, capsys):
    """``--1`` and ``²`` (``str.isdigit`` is true for superscripts) are not integers: label names."""
    rows = [("good", "--1"), ("bad", "²"), ("fine", "--1"), ("awful", "²"), ("nice", "1"), ("sad", "²"),
            ("great", "--1"), ("poor", "1")]  # fmt: skip
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    code, _, err = run_cli(_rm(ws, tmp_path / "out", data=data), capsys)
    assert code == 0 and "Traceback" not in err, err
    labels = json.loads((tmp_path / "out" / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted(["--1", "1", "²"])


# ----------------------------------------------------------------------------- user rewards that raise


def _user(ws, name: str) -> str:
    return f"{ws['root'] / 'rewards.py'}:{name}"


def test_a_user_reward_that_raises_in_ppo_names_the_reward_iteration_and_checkpoint(ws, tmp_path, capsys):
    line = refused(_ppo(ws, tmp_path / "r", reward=_user(ws, "second_call_fails")), capsys,
                   "second_call_fails", "KeyError", "iteration 1", "step-00000001", "--resume")  # fmt: skip
    assert "rewards.py:" in line  # where in the user's file


@pytest.mark.parametrize(
    "name,needle",
    [("boom", "ZeroDivisionError"), ("huge", "float range"), ("exits", "SystemExit"), ("deep", "JSONDecodeError")],
)
def test_a_user_reward_that_raises_is_one_line_naming_it(name, needle, ws, tmp_path, capsys):
    line = refused(_eval(ws, reward=_user(ws, name)), capsys, f"rewards.py:{name}", needle)
    if name != "huge":
        assert "rewards.py:" in line.split(needle, 1)[1]  # the line of the user's file that raised


@pytest.mark.parametrize("command", ["softq", "sample", "weighted-sum"])
def test_a_user_reward_that_raises_in_other_commands_is_one_line(command, ws, tmp_path, capsys):
    reward = _user(ws, "boom")
    argv = {
        "softq": lambda: _softq(ws, tmp_path / "r", reward=reward),
        "sample": lambda: _sample(ws, tmp_path, reward=reward),
        "weighted-sum": lambda: _eval(ws, reward=f"count:e+0.5*{reward}"),
    }[command]()
    refused(argv, capsys, "rewards.py:boom", "ZeroDivisionError")


def test_debug_keeps_the_user_reward_traceback(ws, tmp_path, capsys):
    code, _, err = run_cli(["--debug", *_eval(ws, reward=_user(ws, "boom"))], capsys)
    assert code == 2 and "Traceback" in err and "ZeroDivisionError" in err
    assert "rewards.py" in err and "1 / 0" in err  # the user's own frame


# ----------------------------------------------------------------------------- --out naming a file


def _file(tmp_path) -> Path:
    f = tmp_path / "taken"
    f.write_text("x")
    return f


OUT_IS_FILE = [
    ("ppo", lambda ws, t: _ppo(ws, _file(t))),
    ("ppo-under-file", lambda ws, t: _ppo(ws, _file(t) / "run")),
    ("softq", lambda ws, t: _softq(ws, _file(t))),
    ("rm", lambda ws, t: _rm(ws, _file(t))),
    ("proxy", lambda ws, t: _proxy(ws, _file(t))),
    ("exact-plot", lambda ws, t: ["exact", "--learners", "none", "--plot", _file(t) / "f.png"]),
]


@pytest.mark.parametrize("build", [c[1] for c in OUT_IS_FILE], ids=[c[0] for c in OUT_IS_FILE])
def test_an_output_that_is_a_file_says_what_to_do_before_any_work(build, ws, tmp_path, capsys, no_model):
    before = hashlib.sha256((tmp_path / "taken").read_bytes()).hexdigest() if (tmp_path / "taken").exists() else None
    line = refused(build(ws, tmp_path), capsys, "taken")
    assert "choose" in line or "give" in line, line
    assert before is None or hashlib.sha256((tmp_path / "taken").read_bytes()).hexdigest() == before


def test_an_os_error_that_escapes_says_what_to_do(ws, tmp_path, capsys, monkeypatch):
    """Any OSError that escapes a command (here: a disk that fills while the heads are saved) ends in
    one line naming the file, the OS's reason and what to do."""
    import errno

    import qvlm.heads

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "heads.safetensors"))

    monkeypatch.setattr(qvlm.heads, "atomic_write_bytes", full_disk)
    refused(_offline(ws, "value", tmp_path / "run"), capsys, "heads.safetensors", "free some space")


OUT_IS_INPUT = [  # (id, what the command reads in the folder bb, argv)
    ("rm-into-its-backbone", "backbone", lambda ws, bb: ["train", "rm", "--data", ws["root"] / "rm.jsonl",
                                                         "--backbone", bb, "--out", bb, *RM]),
    ("eval-json-over-the-policy", "ppo", lambda ws, bb: _eval(ws, "--policy", bb, "--json", bb / "training.json")),
    ("generate-out-over-the-model", "model", lambda ws, bb: _gen(ws, "--model", bb, "--out", bb / "config.json")),
]  # fmt: skip


@pytest.mark.parametrize("source,build", [c[1:] for c in OUT_IS_INPUT], ids=[c[0] for c in OUT_IS_INPUT])
def test_an_output_that_is_an_input_is_refused(source, build, ws, tmp_path, capsys, no_model):
    """Writing would overwrite a file the command reads (a backbone, a policy run, a model directory)."""
    bb = tmp_path / "bb"
    shutil.copytree({"backbone": ws["backbone"], "ppo": ws["root"] / "ppo", "model": ws["model"]}[source], bb)
    before = {p: p.read_bytes() for p in bb.rglob("*") if p.is_file()}
    refused(build(ws, bb), capsys, "input of this run")
    assert {p: p.read_bytes() for p in bb.rglob("*") if p.is_file()} == before


def test_an_allocator_failure_is_one_line(ws, tmp_path, capsys, monkeypatch):
    """Whatever size still fails to allocate (a model too large for the machine, say) ends in one line."""

    def too_big(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 128000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(qvlm.loading, "load_model", too_big)
    refused(_gen(ws), capsys, "out of memory", "128000000000 bytes", "--batch-size")
