"""``qvlm train ppo`` end to end on a tiny local model, ``generate --policy``, and its bad input:
exit code 2, one line, no traceback."""

from __future__ import annotations

import json

import pytest

from qvlm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr()


def test_train_ppo_then_generate_with_the_policy(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.txt").write_text("hello\nthe cat\nabc\n")
    out = tmp_path / "run"
    common = ["--model", tiny_dir, "--prompts", tmp_path / "p.txt", "--reward", "count:e", "--out", out]
    flags = ["--iterations", "2", "--prompts-per-iter", "2", "--responses-per-prompt", "2", "--max-new-tokens", "6"]
    code, io = _run(["train", "ppo", *common, *flags, "--no-chat", "--no-progress"], capsys)
    assert code == 0, io.err
    assert "trained ppo for 2 iterations" in io.out
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "heads.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # a finished run is not overwritten; --resume continues it (nothing left to do at 2 of 2)
    code, io = _run(["train", "ppo", *common, *flags, "--no-chat"], capsys)
    assert code == 2 and "already holds a run" in io.err
    rows = tmp_path / "gen.jsonl"
    code, io = _run(
        ["generate", "--model", tiny_dir, "--policy", out, "--prompt", "hi", "--max-new-tokens", "5", "--out", rows],
        capsys,
    )
    assert code == 0, io.err
    assert json.loads(rows.read_text().splitlines()[0])["prompt"] == "hi"
    report = tmp_path / "eval.json"
    code, io = _run(
        ["eval", "--model", tiny_dir, "--policy", out, "--prompts", tmp_path / "p.txt", "--reward", "count:e",
         "--betas", "0", "--max-new-tokens", "5", "--no-chat", "--json", report],
        capsys,
    )  # fmt: skip
    assert code == 0, io.err
    methods = json.loads(report.read_text())["methods"]
    assert set(methods) == {"base", "policy"} and methods["policy"]["kl_to_base"] > 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--kl-coef", "-1"], "--kl-coef is -1.0; it must be a finite number >= 0"),
        (["--ppo-epochs", "0"], "--ppo-epochs is 0; it must be at least 1"),
        (["--prompts", "{tmp}/empty.txt"], "no prompts in the file"),
        (["--reward", "no-such-reward"], "unknown reward"),
        (["--trunk", "frozen"], "--trunk is 'frozen'; it must be one of lora, full"),
    ],
)
def test_bad_input_exits_2_without_traceback(tmp_path, tiny_dir, capsys, extra, needle):
    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    args = ["train", "ppo", "--model", tiny_dir, "--prompts", tmp_path / "p.txt", "--reward", "count:e"]
    args += ["--out", tmp_path / "r"] + [a.format(tmp=tmp_path) for a in extra]
    code, io = _run(args, capsys)
    assert code == 2, io.err
    assert needle in io.err
    assert "Traceback" not in io.err


def test_generate_policy_that_is_not_a_ppo_run(tmp_path, tiny_dir, capsys):
    code, io = _run(["generate", "--model", tiny_dir, "--policy", tmp_path, "--prompt", "hi"], capsys)
    assert code == 2 and "not a `qvlm train ppo` run" in io.err


# Wall-clock fields of metrics.jsonl: the only values that may differ between identical runs.
TIMING_KEYS = ("charts/tokens_per_s",)


def _run_files(run, trunk: str, critic: str) -> dict[str, bytes]:
    """The bytes a PPO run must reproduce: its policy, V head (and separate critic), training.json,
    and metrics.jsonl with the timing fields dropped (every other value, e.g. the reward, the KL and
    the losses, must match to the last bit)."""
    names = ["adapter/adapter_model.safetensors" if trunk == "lora" else "policy.safetensors", "heads.safetensors"]
    names += ["critic.safetensors"] if critic == "separate" else []
    files = {name: (run / name).read_bytes() for name in names + ["training.json"]}
    (ckpt,) = (run / "checkpoint").glob("step-*")  # only the trainable tensors, the frozen base left out
    files["checkpoint/trainable.safetensors"] = (ckpt / "trainable.safetensors").read_bytes()
    assert not (ckpt / "model.safetensors").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(set(TIMING_KEYS) <= set(r) for r in rows)  # the fields dropped are there to drop
    files["metrics.jsonl"] = json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]).encode()
    return files


@pytest.mark.parametrize("trunk,critic", [("lora", "shared"), ("full", "separate")])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_dir, capsys, trunk, critic):
    """Two runs with one seed and one set of settings write byte-identical policies, V heads and
    metrics (timing aside); another seed writes other bytes."""
    (tmp_path / "p.txt").write_text("hello\nthe cat\nabc\n")
    flags = ["--iterations", "2", "--prompts-per-iter", "2", "--responses-per-prompt", "2", "--max-new-tokens", "6"]
    flags += ["--lr", "1e-2", "--trunk", trunk, "--critic", critic, "--no-chat", "--no-progress"]

    def run(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        args = ["train", "ppo", "--model", tiny_dir, "--prompts", tmp_path / "p.txt", "--reward", "count:e"]
        code, io = _run([*args, "--out", out, *flags, "--seed", seed], capsys)
        assert code == 0, io.err
        return _run_files(out, trunk, critic)

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert first == again
    for name in first:
        if name != "training.json":
            assert other[name] != first[name], name
    # the config training.json records differs by the seed alone
    first_info, other_info = json.loads(first["training.json"]), json.loads(other["training.json"])
    assert other_info == {**first_info, "config": {**first_info["config"], "seed": 1}}


def test_reward_help_names_every_form_and_a_reference_reward_trains(tmp_path, tiny_dir, capsys):
    """`--reward` of train ppo and train softq documents every form qvlm.rewards takes (one constant),
    and the forms work: bleu against the prompts file's references, a per-token Python reward summed."""
    from qvlm.rewards import REWARD_HELP

    for command in (["train", "ppo"], ["train", "softq"]):
        code, io = _run([*command, "--help"], capsys)
        assert code == 0
        text = " ".join(io.out.split())
        for form in ("vader-negative", "count:TEXT", "bleu", "chrf", "rougeL", "hf:PATH[:LABEL]", "FILE.py:FUNCTION",
                     "MODULE:FUNCTION", "vader+0.2*length"):  # fmt: skip
            assert form in text, (command, form)
        assert " ".join(REWARD_HELP.split()) in text
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello", "reference": "hello there"}\n{"prompt": "abc", "reference": "abc d"}\n')
    (tmp_path / "r.py").write_text(
        "from qvlm.rewards import token_level\n\n"
        "@token_level\ndef es(prompts, tokens):\n    return [[float('e' in t) for t in row] for row in tokens]\n"
    )
    flags = ["--iterations", "1", "--prompts-per-iter", "2", "--responses-per-prompt", "2", "--max-new-tokens", "5"]
    for i, reward in enumerate(("bleu+0.5*length", f"{tmp_path / 'r.py'}:es")):
        args = [
            "train",
            "ppo",
            "--model",
            tiny_dir,
            "--prompts",
            prompts,
            "--reward",
            reward,
            "--out",
            tmp_path / str(i),
        ]
        code, io = _run([*args, *flags, "--no-chat", "--no-progress"], capsys)
        assert code == 0, io.err
    # bleu needs references: a .txt prompts file has none, refused before the model loads
    (tmp_path / "p.txt").write_text("hello\n")
    args = [
        "train",
        "ppo",
        "--model",
        tiny_dir,
        "--prompts",
        tmp_path / "p.txt",
        "--reward",
        "bleu",
        "--out",
        tmp_path / "x",
    ]
    code, io = _run(args, capsys)
    assert code == 2 and "reference" in io.err and "Traceback" not in io.err
