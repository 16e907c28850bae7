"""The command-line surface: every command documented in README.md and cluster/README.md runs
``--help`` (and every flag it uses is one its CLI knows); every entry point runs as a file, as a
module and as a console script; the shared flags are the same flags in every CLI; exit statuses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md"]
ENTRY_POINTS = {"pipelines/train.py": ("elf-train", "pipelines.train"),
                "pipelines/evaluate.py": ("elf-eval", "pipelines.evaluate"),
                "pipelines/prepare_data.py": ("elf-prepare-data", "pipelines.prepare_data"),
                "experiments/frontier_sweep.py": ("elf-sweep", "experiments.frontier_sweep"),
                "experiments/scaling_ablation.py": ("elf-ablate", "experiments.scaling_ablation")}
SUBCOMMANDS = {"pipelines/evaluate.py": ("evaluate", "score")}


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(doc name, argv after "python")`` of every ``python <repo script> ...`` line in a shell block
    (continuations joined; env assignments, ``ray job submit ... --`` and comments dropped)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0]
                m = re.search(r"\bpython (\S+\.py)\b(.*)$", line)
                if m and (ROOT / m.group(1)).is_file():
                    args = [a for a in shlex.split(m.group(2).replace("[", "").replace("]", ""))
                            if not a.startswith("<") and a != "|"]
                    found.append((doc.name, [m.group(1), *args]))
    return found


def _help(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "usage:" in proc.stdout, proc.stdout[:500]
    return proc.stdout


def test_every_documented_command_runs_help_and_knows_its_flags():
    commands = documented_commands()
    assert len(commands) >= 15, commands  # both READMEs: train, evaluate, score, sweep, ablation, data
    helps: dict[tuple[str, ...], str] = {}
    for doc, (script, *args) in commands:
        sub = [a for a in args[:1] if a in SUBCOMMANDS.get(script, ())] or list(SUBCOMMANDS.get(script, ())[:1])
        key = (script, *sub)
        if key not in helps:
            helps[key] = _help([script, *sub, "--help"])
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", helps[key]), f"{doc}: {' '.join(key)} has no {flag}"


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_every_entry_point_runs_as_file_module_and_console_script(script):
    console, module = ENTRY_POINTS[script]
    as_file = _help([script, "--help"])
    as_module = _help(["-m", module, "--help"])
    proc = subprocess.run([str(Path(sys.executable).parent / console), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-1000:]
    # the same parser each way (the program name aside)
    strip = lambda text: text.split("\n", 1)[1]  # noqa: E731
    assert strip(as_file) == strip(as_module) == strip(proc.stdout)


def _parser_of(script: str):
    """Each CLI's argparse parser, built by running its parse function on --help in-process."""
    import importlib

    module = importlib.import_module(ENTRY_POINTS[script][1])
    captured = {}
    real = cli.parser

    def spy(*a, **k):
        captured["p"] = real(*a, **k)
        return captured["p"]

    cli.parser = spy
    try:
        with pytest.raises(SystemExit):
            module.main(["--help"])
    finally:
        cli.parser = real
    return captured["p"]


def test_shared_flags_are_the_same_flags_everywhere(capsys):
    seen: dict[str, set] = {}
    for script in ENTRY_POINTS:
        parser = _parser_of(script)
        parsers = [parser] + [a for act in parser._actions if hasattr(act, "choices") and isinstance(act.choices, dict)
                              for a in act.choices.values()]
        for p in parsers:
            for action in p._actions:
                if action.dest in cli.FLAGS:
                    seen.setdefault(action.dest, set()).add((tuple(action.option_strings), action.default))
                # names that meant the same thing before the one convention are gone
                assert not {"--address", "--ema", "--no-ema", "--train-override", "--samples-per-trial",
                            "--sizes", "--search"} & set(action.option_strings), (script, action.option_strings)
    capsys.readouterr()
    for dest, variants in seen.items():
        if dest != "overrides":
            # one name, one default (None as well only where a YAML's value stands for an unset flag)
            assert len({v[0] for v in variants}) == 1 and len({v[1] for v in variants} - {None}) <= 1, (dest, variants)
    assert {"checkpoint", "task", "num_samples", "weights", "evaluator", "ray_address", "tracking_uri",
            "threads"} <= set(seen)
    # None: the sweep / ablation YAML's own scoring setting stands unless the flag is given
    assert seen["evaluator"] == {(("--evaluator",), "auto"), (("--evaluator",), None)}


def test_exit_status_rule(capsys):
    from pipelines import train

    assert train.main(["optim.ema_decay=1.5"]) == 2  # bad input: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "optim.ema_decay=1.5 is not in [0, 1)" in err
    with pytest.raises(ZeroDivisionError):  # anything unexpected is not swallowed: traceback, exit 1
        cli.run_main(lambda argv: 1 // 0, [])
    assert cli.run_main(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt), []) == 130


@pytest.mark.parametrize("argv, message", [
    (["--worker-cpus", "-1"], "argument --worker-cpus: -1 is not > 0"),
    (["--worker-gpus", "two"], "argument --worker-gpus: 'two' is not a float"),
])
def test_numeric_flags_out_of_range_are_usage_errors(argv, message, capsys):
    from pipelines import evaluate

    with pytest.raises(SystemExit) as stop:
        evaluate.main(["evaluate", "--checkpoint", "x", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
