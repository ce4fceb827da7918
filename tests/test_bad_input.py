"""Bad input through the CLI, in-process, on a tiny model: every case ends with exit code 2, one line
on stderr (no traceback), and no file that was there before changed (issue 13).

Also: a diverging run stops with exit 2 at the step whose loss is non-finite and keeps the last good
checkpoint; heads with a non-finite weight are refused; ``--debug`` shows the traceback; ``eval`` on
one prompt writes strict JSON.
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

from qvlm.cli import main

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    """A workspace: the tiny model, prompts, samples, trained ILQL heads and a resumable run."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "prompts.txt").write_text("ab\ncd\n")
    rows = [
        {"prompt": p, "response": r, "reward": float(i % 3)}
        for i, (p, r) in enumerate(
            [
                ("ab", "cde"),
                ("cd", "eee"),
                ("ef", "ab"),
                ("gh", "ae"),
                ("ab", "b"),
                ("cd", "ee"),
                ("ef", "x"),
                ("gh", "e"),
            ]
        )
    ]
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tiny_dir), "--data", str(root / "samples.jsonl"), "--max-length", "32", "--no-progress"]
    code = main(["train", "ilql", *common, "--out", str(root / "run"), "--steps", "2", "--batch-size", "4",
                 "--head-hidden", "8", "--checkpoint-every", "1"])  # fmt: skip
    assert code == 0
    return {"root": root, "model": str(tiny_dir), "common": common}


def _hash_tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``qvlm argv`` in-process: (exit code, stdout, stderr). An exception escaping main fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(argv, capsys, ws, tmp_path, expect: str | None = None) -> str:
    before = _hash_tree(ws["root"], Path(ws["model"]), tmp_path)
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    if expect:
        assert expect.lower() in lines[0].lower(), lines[0]
    assert _hash_tree(ws["root"], Path(ws["model"]), tmp_path) == before, "a file that was there changed"
    return lines[0]


def _copy_heads(ws, tmp_path, name="heads") -> Path:
    dst = tmp_path / name
    src = ws["root"] / "run"
    dst.mkdir()
    for f in ("heads.safetensors", "heads_config.json", "training.json"):
        shutil.copy(src / f, dst / f)
    return dst


def _copy_run(ws, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(ws["root"] / "run", dst)
    return dst


def _latest(run: Path) -> Path:
    return run / "checkpoint" / (run / "checkpoint" / "latest").read_text().strip()


# ----------------------------------------------------------------------------- the table
# Each case: (id, build(ws, tmp_path) -> argv, a word the message must contain). Built lazily, so a
# case can prepare its own bad files under tmp_path (which is hashed too: nothing may change there).


def _gen(ws, *extra, src=("--prompt", "ab")):
    return ["generate", "--model", ws["model"], *src, "--max-new-tokens", "4", *extra]


def _sample(ws, tmp_path, *extra, prompts=None, out=None):
    return ["sample", "--model", ws["model"], "--prompts", prompts or ws["root"] / "prompts.txt", "--reward",
            "count:e", "--max-new-tokens", "4", "--out", out or tmp_path / "s.jsonl", *extra]  # fmt: skip


def _eval(ws, *extra, prompts=None):
    return ["eval", "--model", ws["model"], "--prompts", prompts or ws["root"] / "prompts.txt", "--reward", "count:e",
            "--max-new-tokens", "4", "--betas", "0", *extra]  # fmt: skip


def _train(ws, tmp_path, algo="ilql", *extra, data=None):
    common = list(ws["common"])
    if data is not None:
        common[3] = str(data)
    return ["train", algo, *common, "--out", tmp_path / "out", "--steps", "1", *extra]


def _inspect(ws, *extra):
    return ["inspect", "--model", ws["model"], "--heads", ws["root"] / "run", *extra]


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _heads_with(ws, tmp_path, mutate) -> Path:
    heads = _copy_heads(ws, tmp_path)
    mutate(heads / "heads.safetensors")
    return heads


def _nan_weight(f: Path) -> None:
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(f))


def _wider_config(f: Path) -> None:
    cfg = f.parent / "heads_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "head_hidden": 16}))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random(f: Path) -> None:
    f.write_bytes(os.urandom(f.stat().st_size))


def _corrupt_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))


def _bad_resume(mutate):
    def build(ws, tmp_path):
        run = _copy_run(ws, tmp_path)
        mutate(run)
        return ["train", "ilql", *ws["common"], "--out", run, "--steps", "2", "--batch-size", "4",
                "--head-hidden", "8", "--checkpoint-every", "1", "--resume"]  # fmt: skip

    return build


def _big_reward_file(tmp_path):
    return _write(tmp_path / "big.jsonl", '{"prompt": "ab", "response": "cd", "reward": ' + "9" * 400 + "}\n")


CASES = [
    # heads and checkpoint files
    ("heads-truncated", lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, _truncate), "--beta", "1"), "heads"),
    ("heads-random", lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, _random), "--beta", "1"), "heads"),
    ("heads-header", lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, _corrupt_header), "--beta", "1"), "heads"),
    (
        "heads-empty",
        lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, lambda f: f.write_bytes(b"")), "--beta", "1"),
        "heads",
    ),  # fmt: skip
    (
        "heads-nan-weight",
        lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, _nan_weight), "--beta", "1"),
        "not finite",
    ),  # fmt: skip
    (
        "heads-nan-inspect",
        lambda ws, t: ["inspect", "--model", ws["model"], "--heads", _heads_with(ws, t, _nan_weight), "--text", "ab"],
        "not finite",
    ),  # fmt: skip
    (
        "heads-config-binary",
        lambda ws, t: _gen(
            ws,
            "--heads",
            _heads_with(ws, t, lambda f: _write(f.parent / "heads_config.json", b"\xff\xfe\x00")),
            "--beta",
            "1",
        ),
        "heads_config",
    ),
    ("resume-trainer-state-random", _bad_resume(lambda r: _random(_latest(r) / "trainer_state.pt")), "trainer_state"),
    (
        "resume-trainer-state-empty",
        _bad_resume(lambda r: _write(_latest(r) / "trainer_state.pt", b"")),
        "trainer_state",
    ),  # fmt: skip
    ("resume-heads-truncated", _bad_resume(lambda r: _truncate(_latest(r) / "heads.safetensors")), "heads"),
    ("resume-config-binary", _bad_resume(lambda r: _write(_latest(r) / "config.json", b"\xff\x00")), "config"),
    ("resume-other-shape", lambda ws, t: [*_bad_resume(lambda r: None)(ws, t), "--head-hidden", "16"], "--head-hidden"),
    (
        "heads-config-other-shape",
        lambda ws, t: _gen(ws, "--heads", _heads_with(ws, t, _wider_config), "--beta", "1"),
        "another shape",
    ),  # fmt: skip
    # text files that are not text
    ("samples-invalid-utf8", lambda ws, t: _train(ws, t, data=_write(t / "s.jsonl", b'{"prompt": "\xff"}\n')), ":1"),
    ("samples-binary", lambda ws, t: _train(ws, t, data=_write(t / "s.jsonl", os.urandom(256))), "s.jsonl"),
    ("prompts-invalid-utf8", lambda ws, t: _gen(ws, src=("--prompts", _write(t / "p.txt", b"ab\n\xff\xfe\n"))), ":2"),
    ("prompts-binary-sample", lambda ws, t: _sample(ws, t, prompts=_write(t / "p.txt", os.urandom(64))), "p.txt"),
    ("prompts-is-directory", lambda ws, t: _eval(ws, prompts=t), "prompt"),
    ("samples-is-directory", lambda ws, t: _train(ws, t, data=t), "no such file"),
    ("reward-400-digits", lambda ws, t: _train(ws, t, data=_big_reward_file(t)), "big.jsonl:1"),
    # per-sample errors name the file and the 1-based line
    (
        "sample-token-rewards-length",
        lambda ws, t: _train(
            ws,
            t,
            data=_write(
                t / "s.jsonl",
                '{"prompt":"ab","response":"cd","reward":1}\n{"prompt":"ab","response":"cd","token_rewards":[1]}\n',
            ),
        ),
        "s.jsonl:2",
    ),
    (
        "sample-prompt-too-long",
        lambda ws, t: _train(
            ws,
            t,
            data=_write(
                t / "s.jsonl",
                '{"prompt":"ab","response":"cd","reward":1}\n\n{"prompt":"'
                + "a" * 40
                + '","response":"cd","reward":1}\n',
            ),
        ),
        "s.jsonl:3",
    ),
    # output paths
    ("sample-out-is-dir", lambda ws, t: _sample(ws, t, out=t), "directory"),
    ("sample-out-under-file", lambda ws, t: _sample(ws, t, out=_write(t / "f", "x") / "s.jsonl"), "not a directory"),
    ("generate-out-is-dir", lambda ws, t: _gen(ws, "--out", t), "directory"),
    (
        "generate-out-is-prompts",
        lambda ws, t: _gen(ws, "--out", ws["root"] / "prompts.txt", src=("--prompts", ws["root"] / "prompts.txt")),
        "prompts",
    ),  # fmt: skip
    ("eval-json-is-dir", lambda ws, t: _eval(ws, "--json", t), "directory"),
    ("eval-json-under-file", lambda ws, t: _eval(ws, "--json", _write(t / "f", "x") / "m.json"), "not a directory"),
    ("inspect-out-is-dir", lambda ws, t: _inspect(ws, "--text", "ab", "--out", t), "directory"),
    ("exact-json-is-dir", lambda ws, t: ["exact", "--learners", "none", "--json", t], "directory"),
    (
        "train-out-is-file",
        lambda ws, t: _train(ws, t)[:-4] + ["--out", _write(t / "f", "x"), "--steps", "1"],
        "not a directory",
    ),  # fmt: skip
    (
        "train-out-under-file",
        lambda ws, t: _train(ws, t)[:-4] + ["--out", _write(t / "f", "x") / "run"],
        "not a directory",
    ),  # fmt: skip
    # numbers
    ("generate-beta-nan", lambda ws, t: _gen(ws, "--beta", "nan", "--heads", ws["root"] / "run"), "beta"),
    ("generate-temperature-nan", lambda ws, t: _gen(ws, "--temperature", "nan"), "temperature"),
    ("generate-batch-size-0", lambda ws, t: _gen(ws, "--batch-size", "0"), "--batch-size"),
    ("generate-top-p-nan", lambda ws, t: _gen(ws, "--top-p", "nan"), "--top-p"),
    ("eval-betas-nan", lambda ws, t: _eval(ws, "--betas", "nan", "--heads", ws["root"] / "run"), "betas"),
    ("eval-betas-empty", lambda ws, t: _eval(ws, "--betas", ""), "betas"),
    ("eval-betas-inf", lambda ws, t: _eval(ws, "--betas", "0,inf", "--heads", ws["root"] / "run"), "betas"),
    ("train-batch-size-0", lambda ws, t: _train(ws, t, "ilql", "--batch-size", "0"), "--batch-size"),
    ("train-target-sync-0", lambda ws, t: _train(ws, t, "ilql", "--target-sync-every", "0"), "--target-sync-every"),
    ("train-weight-decay-neg", lambda ws, t: _train(ws, t, "ilql", "--weight-decay", "-1"), "--weight-decay"),
    ("train-head-hidden-neg", lambda ws, t: _train(ws, t, "ilql", "--head-hidden", "-1"), "head-hidden"),
    ("train-grad-clip-nan", lambda ws, t: _train(ws, t, "ilql", "--grad-clip", "nan"), "--grad-clip"),
    ("train-cql-scale-nan", lambda ws, t: _train(ws, t, "ilql", "--cql-scale", "nan"), "--cql-scale"),
    ("train-lr-nan", lambda ws, t: _train(ws, t, "ilql", "--lr", "nan"), "lr"),
    ("train-lr-inf", lambda ws, t: _train(ws, t, "value", "--lr", "inf"), "lr"),
    ("train-gamma-5", lambda ws, t: _train(ws, t, "ilql", "--gamma", "5"), "gamma"),
    ("train-value-gamma-5", lambda ws, t: _train(ws, t, "value", "--gamma", "5"), "gamma"),
    ("train-value-lam-2", lambda ws, t: _train(ws, t, "value", "--lam", "2"), "lam"),
    ("train-value-epochs-0", lambda ws, t: _train(ws, t, "value")[:-2] + ["--epochs", "0"], "epochs"),
    ("train-value-steps-neg", lambda ws, t: _train(ws, t, "value")[:-2] + ["--steps", "-5"], "steps"),
    (
        "train-max-length-over-context",
        lambda ws, t: _train(
            ws,
            t,
            "value",
            "--max-length",
            "100000",
            data=_write(
                t / "s.jsonl",
                '{"prompt": "ab", "response": "cd", "reward": 1}\n{"prompt": "ab", "response": "'
                + "c" * 300
                + '", "reward": 1}\n',
            ),
        ),
        "s.jsonl:2",
    ),
    (
        "exact-concentration-neg",
        lambda ws, t: ["exact", "--learners", "none", "--concentration", "-1"],
        "concentration",
    ),  # fmt: skip
    ("exact-seed-neg", lambda ws, t: ["exact", "--learners", "none", "--seed", "-1"], "seed"),
    ("demo-train-prompts-neg", lambda ws, t: ["demo", "--out", t / "demo", "--train-prompts", "-1"], "train-prompts"),
    ("demo-betas-nan", lambda ws, t: ["demo", "--out", t / "demo", "--betas", "1,nan"], "--betas"),
    ("demo-mc-betas-text", lambda ws, t: ["demo", "--out", t / "demo", "--mc-betas", "x"], "--mc-betas"),
    ("demo-betas-empty", lambda ws, t: ["demo", "--out", t / "demo", "--betas", ""], "--betas"),
    ("demo-reward-unknown", lambda ws, t: ["demo", "--out", t / "demo", "--reward", "nope"], "unknown reward"),
    ("demo-out-is-file", lambda ws, t: ["demo", "--out", _write(t / "f", "x")], "not a directory"),
    ("sample-n-0", lambda ws, t: _sample(ws, t, "--n", "0"), "--n"),
    ("sample-max-prompts-neg", lambda ws, t: _sample(ws, t, "--max-prompts", "-1"), "max-prompts"),
    # context and runaways
    ("inspect-text-over-context", lambda ws, t: _inspect(ws, "--text", "a" * 400), "context"),
    ("generate-prompt-over-context", lambda ws, t: _gen(ws, src=("--prompt", "a" * 5000)), "context"),
    ("sample-n-billion", lambda ws, t: _sample(ws, t, "--n", "1000000000"), "--n"),
    ("sample-n-times-prompts", lambda ws, t: _sample(ws, t, "--n", "600000"), "1,200,000 responses"),
    (
        "prompts-line-over-cap",
        lambda ws, t: _gen(ws, src=("--prompts", _write(t / "p.txt", "ab\n" + "a" * 1_100_000))),
        "p.txt:2",
    ),  # fmt: skip
]


@pytest.mark.parametrize("build,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(build, expect, ws, tmp_path, capsys, monkeypatch):
    import qvlm.apps.demo

    def demo_started(*a, **k):  # the demo's work (SmolLM2, minutes) must never start on bad input
        raise AssertionError("the demo started: the bad input was not refused before the work")

    monkeypatch.setattr(qvlm.apps.demo, "run_demo", demo_started)
    argv = build(ws, tmp_path)
    assert_refused(argv, capsys, ws, tmp_path, expect)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_unwritable_output_refused_before_work(ws, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_refused(_eval(ws, "--json", ro / "m.json"), capsys, ws, tmp_path, "writ")
    finally:
        ro.chmod(0o755)


def test_unwritable_output_refused_before_work_any_user(ws, tmp_path, capsys, monkeypatch):
    """The writability probe runs before the model loads (a failing probe stands for a read-only disk)."""
    import qvlm.fileio as fileio

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    loaded = []
    import qvlm.cli.eval

    monkeypatch.setattr(qvlm.cli.eval, "load", lambda args: loaded.append(1))
    assert_refused(_eval(ws, "--json", tmp_path / "m.json"), capsys, ws, tmp_path, "read-only")
    assert not loaded


# ----------------------------------------------------------------------------- the rest of the promises


def test_debug_shows_the_traceback(ws, tmp_path, capsys):
    code, _, err = run_cli(["--debug", *_gen(ws, "--temperature", "nan")], capsys)
    assert code == 2 and "Traceback" in err and "temperature" in err


@pytest.mark.parametrize("reward,first_bad", [(1e30, 0), (1e10, 2)])
def test_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(ws, tmp_path, capsys, reward, first_bad):
    """lr 1e6: with a reward of 1e30 the first loss is already inf; with 1e10 the run blows up at step 2."""
    from qvlm.configs import ILQLConfig
    from qvlm.model import load_qv_model
    from qvlm.train.checkpoint import latest_checkpoint

    rows = [{"prompt": "ab", "response": "cd" * (i + 1), "reward": reward} for i in range(8)]
    data = _write(tmp_path / "huge.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = _train(ws, tmp_path, "ilql", data=data)[:-4] + ["--out", run, "--steps", "6", "--batch-size", "4",
                                                       "--lr", "1e6", "--head-hidden", "8", "--checkpoint-every", "1"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "diverged at step" in err
    step = int(err.split("diverged at step ")[1].split(":")[0])
    assert step == first_bad
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").exists() else []  # fmt: skip
    assert all(m["step"] < step for m in metrics)  # nothing of the diverged step was logged
    assert not (run / "heads.safetensors").exists()  # no final heads from a diverged run
    ckpt = latest_checkpoint(run)
    if step == 0:
        assert ckpt is None
    else:
        assert ckpt is not None and ckpt.name == f"step-{step:08d}"
        from qvlm.loading import load_model

        trunk, _ = load_model(ws["model"], device="cpu")
        qv = load_qv_model(trunk, ckpt)  # the last good checkpoint's heads load (finite)
        assert all(torch.isfinite(p).all() for p in qv.heads.parameters())
        saved = json.loads((ckpt / "config.json").read_text())
        assert ILQLConfig(**saved).lr == 1e6


def test_eval_on_one_prompt_writes_strict_json(ws, tmp_path, capsys):
    out = tmp_path / "m.json"
    p = _write(tmp_path / "one.txt", "ab\n")
    code, _, err = run_cli(["eval", "--model", ws["model"], "--prompts", p, "--reward", "count:e",
                            "--max-new-tokens", "4", "--betas", "0", "--json", out], capsys)  # fmt: skip
    assert code == 0, err

    def no_constants(name):
        raise AssertionError(f"{name} in JSON")

    row = json.loads(out.read_text(), parse_constant=no_constants)["methods"]["base"]
    assert row["reward_ci95"] is None


# ----------------------------------------------------------------------------- the helpers, directly


def test_check_fits_tokenises_a_bounded_prefix_only():
    from qvlm.errors import QVLMError
    from qvlm.mdp import CHARS_PER_TOKEN_BOUND, check_fits
    from tests.helpers import char_tokenizer

    tok = char_tokenizer()
    seen = []

    class Counting:
        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    with pytest.raises(QVLMError, match="too long"):
        check_fits(Counting(), "a" * 5_000_000, 100, "prompt 1")
    assert seen == [CHARS_PER_TOKEN_BOUND * 100]  # 800 characters tokenised, not 5 million
    seen.clear()
    check_fits(Counting(), "a" * 50, 100, "prompt 1")  # short: left to the exact check
    assert seen == []


def test_read_lines_caps_a_line_and_names_file_and_line(tmp_path):
    from qvlm.errors import QVLMError
    from qvlm.fileio import read_lines

    f = _write(tmp_path / "p.txt", "ab\ncd\r\n" + "x" * 100 + "\n")
    assert list(read_lines(f, max_line_bytes=101)) == [(1, "ab"), (2, "cd"), (3, "x" * 100)]
    with pytest.raises(QVLMError, match=r"p\.txt:3: line longer than 50 bytes"):
        list(read_lines(f, max_line_bytes=50))
    with pytest.raises(QVLMError, match=r"p\.txt:2: not UTF-8 text \(byte 0xff at offset 1\)"):
        list(read_lines(_write(tmp_path / "p.txt", b"ok\na\xff\n")))
    with pytest.raises(QVLMError, match=r"p\.txt:1: binary content"):
        list(read_lines(_write(tmp_path / "p.txt", b"a\x00b\n")))


def test_check_output_file_creates_nothing(tmp_path):
    from qvlm.errors import QVLMError
    from qvlm.fileio import check_output_dir, check_output_file

    check_output_file(tmp_path / "new" / "deeper" / "out.json", "--out")
    check_output_dir(tmp_path / "run", "--out")
    assert list(tmp_path.iterdir()) == []
    src = _write(tmp_path / "p.txt", "ab\n")
    with pytest.raises(QVLMError, match="also an input"):
        check_output_file(tmp_path / "." / "p.txt", "--out", inputs=(src,))


def test_parse_floats_refuses_empty_and_non_finite():
    from qvlm.cli._common import parse_floats
    from qvlm.errors import QVLMError

    assert parse_floats("0, 1,2.5", "--betas") == [0.0, 1.0, 2.5]
    for bad in ("", " , ", "nan", "1,inf", "-inf", "x"):
        with pytest.raises(QVLMError, match="--betas"):
            parse_floats(bad, "--betas")


def test_sample_location_is_not_written_back(tmp_path):
    from qvlm.jsonl import read_samples

    f = _write(tmp_path / "s.jsonl", '\n{"prompt": "ab", "response": "cd", "reward": 1}\n')
    (s,) = read_samples(f)
    assert s.where == f"{f}:2" and "where" not in s.to_json()
