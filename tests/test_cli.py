"""The qvlm CLI end to end on a tiny local model, and its errors: exit code 2, no traceback."""

import json
import subprocess
import sys

import pytest

from qvlm.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "qvlm", *map(str, args)], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_commands():
    code, out, _ = run_cli("--help")
    assert code == 0
    for cmd in ("sample", "train", "generate", "eval", "exact"):
        assert cmd in out


def test_train_help_documents_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "ilql", "--help"])
    out = capsys.readouterr().out
    assert "--tau TAU" in out and "expectile of V over Q" in out and "(default: 0.7)" in out


def test_sample_train_generate_eval(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\nef\n")
    samples = tmp_path / "samples.jsonl"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_dir),
                "--prompts",
                str(prompts),
                "--reward",
                "count:e",
                "--n",
                "4",
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in samples.read_text().splitlines()]
    assert len(rows) == 12 and {"prompt", "response", "reward", "finished"} <= set(rows[0])
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "ilql",
                "--model",
                str(tiny_dir),
                "--data",
                str(samples),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    for name in ("heads.safetensors", "heads_config.json", "training.json", "metrics.jsonl", "checkpoint"):
        assert (run / name).exists(), name
    out = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--heads",
                str(run),
                "--prompts",
                str(prompts),
                "--beta",
                "2",
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 3
    metrics = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--heads",
                str(run),
                "--prompts",
                str(prompts),
                "--reward",
                "count:e",
                "--betas",
                "0,2",
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
                "--json",
                str(metrics),
            ]
        )
        == 0
    )
    methods = json.loads(metrics.read_text())["methods"]
    assert set(methods) == {"base", "guided_beta_2"}
    assert methods["base"]["kl_to_base"] == pytest.approx(0.0, abs=1e-5)
    assert methods["guided_beta_2"]["kl_to_base"] > 0
    args = ["eval", "--model", str(tiny_dir), "--heads", str(run), "--prompts", str(prompts), "--reward", "count:e"]
    args += [
        "--betas",
        "0,2",
        "--max-new-tokens",
        "8",
        "--seed",
        "0",
        "--samples-per-prompt",
        "3",
        "--json",
        str(metrics),
    ]
    assert main(args) == 0
    payload = json.loads(metrics.read_text())
    assert payload["samples_per_prompt"] == 3 and payload["n_prompts"] == 3
    assert all(row["n"] == 9 for row in payload["methods"].values())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "ilql", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/r"], "no such file"),
        (["train", "ilql", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r"], "bad.jsonl:2"),
        (["train", "ilql", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r", "--tau", "1.5"], "tau is 1.5"),
        (["generate", "--model", "{tmp}/nope", "--prompt", "hi"], "could not load model"),
        (["generate", "--model", "{tiny}", "--prompt", "hi", "--beta", "2"], "needs --heads"),
        (["generate", "--model", "{tiny}", "--prompt", " "], "prompt 1 is empty"),
        (["generate", "--model", "{tiny}", "--heads", "{tmp}", "--prompt", "hi"], "no heads here"),
        (["sample", "--model", "{tiny}", "--prompts", "{tmp}/p.txt", "--reward", "sentiment"], "unknown reward"),
        (["sample", "--model", "{tiny}", "--prompts", "{tmp}/p.txt", "--reward", "bleu"], "give a .jsonl prompts file"),
        (["eval", "--model", "{tiny}", "--prompts", "{tmp}/p.txt", "--betas", "0,x"], "--betas must be"),
        (["train", "ilql", "--data", "x"], "required"),
        (
            ["train", "ilql", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r", "--cql-scale", "nan"],
            "--cql-scale is nan",
        ),
        (
            ["train", "value", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r", "--grad-clip", "nan"],
            "--grad-clip is nan",
        ),
        (["train", "value", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r", "--batch-size", "0"], "--batch-size is 0"),
        (["generate", "--model", "{tiny}", "--prompt", "hi", "--beta", "nan"], "beta is nan"),
        (["generate", "--model", "{tiny}", "--prompt", "hi", "--temperature", "nan"], "temperature is nan"),
        (["train", "value", "--data", "x", "--out", "{tmp}/r", "--target", "gae"], "invalid choice: 'gae'"),
    ],
)
def test_bad_input_exits_2_without_traceback(tmp_path, tiny_dir, capsys, args, needle):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b", "reward": 1}\n{"prompt": "a"}\n')
    (tmp_path / "p.txt").write_text("hello\n")
    args = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args]
    if args[0] in ("train", "sample") and "--model" not in args:
        args += ["--model", str(tiny_dir)]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n")
    code, _, err = run_cli("train", "ilql", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "r")
    assert code == 2
    assert "bad.jsonl:1: not valid JSON" in err and "Traceback" not in err


def _walk(parser, path=("qvlm",)):
    """``(command path, action)`` for every action of every (sub)command parser."""
    import argparse

    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_flag_of_every_command_has_help():
    import argparse

    from qvlm.cli import build_parser

    seen, missing = set(), []
    for path, action in _walk(build_parser()):
        if isinstance(action, argparse._HelpAction):
            continue
        seen.add(path)
        if not (action.help or "").strip():
            missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    commands = {" ".join(p[1:]) for p in seen}
    assert {"sample", "train ilql", "train value", "generate", "eval", "inspect", "demo", "exact"} <= commands


@pytest.mark.parametrize("command", [["sample"], ["train", "ilql"], ["train", "value"], ["generate"], ["eval"]])
def test_model_commands_take_device_and_dtype(command):
    from qvlm.cli import build_parser

    parser = build_parser()
    required = {"sample": ["--prompts", "p"], "train": ["--data", "d", "--out", "o"], "eval": ["--prompts", "p"]}
    extra = required.get(command[0], ["--prompt", "hi"])
    args = parser.parse_args([*command, *extra, "--device", "cuda:1", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")
    defaults = parser.parse_args([*command, *extra])
    assert (defaults.device, defaults.dtype) == ("auto", "float32")


def test_inspect_and_demo_take_device_and_dtype():
    from qvlm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["inspect", "--heads", "h", "--text", "t", "--device", "cpu", "--dtype", "float16"])
    assert (args.device, args.dtype) == ("cpu", "float16")
    args = parser.parse_args(["demo", "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")


def test_optional_bool_and_optional_int_flags():
    from qvlm.cli import build_parser

    parser = build_parser()
    base = ["generate", "--prompt", "hi"]
    assert parser.parse_args(base).chat is None  # None: decided by the tokenizer
    assert parser.parse_args([*base, "--chat"]).chat is True
    assert parser.parse_args([*base, "--no-chat"]).chat is False
    assert parser.parse_args(base).seed is None and parser.parse_args([*base, "--seed", "7"]).seed == 7


def _train_value(tiny_dir, data, out, seed):
    args = ["train", "value", "--model", tiny_dir, "--data", data, "--out", out, "--seed", seed, "--with-q"]
    args += ["--epochs", "1", "--batch-size", "4", "--max-length", "32", "--no-progress", "--device", "cpu"]
    assert main([str(a) for a in args]) == 0
    return (out / "heads.safetensors").read_bytes()


def test_same_seed_gives_byte_identical_heads(tmp_path, tiny_dir):
    data = tmp_path / "samples.jsonl"
    rows = [{"prompt": p, "response": p[::-1] + "e", "reward": float(i % 2)} for i, p in enumerate(["ab", "cd"] * 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = _train_value(tiny_dir, data, tmp_path / "a", 0)
    second = _train_value(tiny_dir, data, tmp_path / "b", 0)  # the global RNG has moved on since
    assert first == second
    assert _train_value(tiny_dir, data, tmp_path / "c", 1) != first  # the seed is what decides
