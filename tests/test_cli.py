"""The CLI shell: instant start-up, exit codes, error lines, completions, settings views."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinystory import __version__
from tinystory.cli.app import app, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "datasets", "bitsandbytes", "wandb", "accelerate", "numpy", "tokenizers"]
runner = CliRunner()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinystory", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "argv,env",
    [
        (["--help"], {}),
        (["--version"], {}),
        (["train", "--help"], {}),
        (["generate", "--help"], {}),
        (["prepare", "--help"], {}),
        ([], {"_TINYSTORY_COMPLETE": "complete_bash", "COMP_WORDS": "tinystory tr", "COMP_CWORD": "1"}),
    ],
)
def test_startup_imports_nothing_heavy(argv, env):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['tinystory', *{argv!r}]\n"
        "try:\n    runpy.run_module('tinystory', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert "HEAVY=\n" in r.stderr, r.stderr[-2000:]


def test_help_lists_the_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("prepare", "train", "eval", "generate", "quantize", "push"):
        assert cmd in r.output


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tinystory {__version__}"


def test_usage_error_exits_2():
    r = run_cli("train", "--no-such-flag")
    assert r.returncode == 2
    assert "No such option: --no-such-flag" in r.stderr
    assert run_cli("no-such-command").returncode == 2


def test_tinystory_error_is_one_red_line_exit_1():
    r = run_cli("config", "show", "--profile", "tny")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: unknown profile 'tny' (did you mean 'tiny'?)"
    assert r.stdout == ""


def test_debug_shows_the_traceback():
    r = run_cli("config", "show", "--profile", "tny", env={"TINYSTORY_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "SettingsError" in r.stderr


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import tinystory.cli.app as app_module

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module, "_app_for", lambda args: interrupted)
    with pytest.raises(SystemExit) as e:
        main(["config", "path"])
    assert e.value.code == 130
    assert "error: interrupted" in capsys.readouterr().err


def test_a_command_runs_in_an_app_that_holds_only_it(monkeypatch):
    from typer.main import get_command

    import tinystory.cli.app as app_module
    from tinystory.cli.completions import COMPLETE_VAR

    assert set(get_command(app).commands) == set(app_module.COMMANDS) == {
        "prepare", "train", "eval", "generate", "quantize", "push", "serve", "profiles", "config"}
    assert set(get_command(app_module._app_for(["prepare", "--help"])).commands) == {"prepare"}
    assert set(get_command(app_module._app_for(["config", "path"])).commands) == {"config"}
    assert app_module._app_for([]) is app and app_module._app_for(["--version"]) is app
    monkeypatch.setenv(COMPLETE_VAR, "complete_bash")  # completion needs every command
    assert app_module._app_for(["prepare"]) is app


def test_main_in_process_returns_instead_of_ending_the_process(capsys):
    # a QUICK_EXIT command ends the process only when main() has the process's own argv
    with pytest.raises(SystemExit) as e:
        main(["profiles"])
    assert e.value.code == 0 and "rtx2070" in capsys.readouterr().out


def test_quick_exit_keeps_all_of_a_redirected_stdout(tmp_path):
    # `prepare` prints its result with print(); to a file, stdout is block-buffered, so the
    # quick exit has to flush it (the summary on stderr goes through rich)
    dest = tmp_path / "p"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        r = subprocess.run([sys.executable, "-m", "tinystory", "prepare", "--profile", "tiny", "--dataset", "sample",
                            "--max-stories", "30", "--out", str(dest)], stdout=out, stderr=err, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert r.returncode == 0, (tmp_path / "err.txt").read_text()
    assert (tmp_path / "out.txt").read_text() == f"{dest}\n"
    assert "prepared data (bpe:" in (tmp_path / "err.txt").read_text()


def test_config_show_prints_sources(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = 0.01\n")
    r = runner.invoke(app, ["config", "show", "-p", "tiny", "--config", str(cfg), "--set", "train.seed=3",
                            "--section", "train"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    lines = {line.split("│")[1].strip(): line for line in r.output.splitlines() if line.count("│") >= 4}
    assert "profile:tiny" in lines["train.block_size"]
    assert "config:" in lines["train.lr"] and "0.01" in lines["train.lr"]
    assert "--set" in lines["train.seed"]
    assert "default" in lines["train.grad_accum"]


def test_profiles_lists_every_profile():
    r = runner.invoke(app, ["profiles"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    for name in ("tiny", "cpu", "rtx2070", "a100"):
        assert f"│ {name} " in r.output


def test_completions_are_current():
    from tinystory.cli.completions import SHELLS, script

    for shell, name in SHELLS.items():
        committed = (ROOT / "completions" / name).read_text(encoding="utf-8")
        assert committed == script(shell), f"completions/{name} is stale: run python -m tinystory.cli.completions"


def test_completion_answers_commands():
    r = run_cli(env={"_TINYSTORY_COMPLETE": "complete_bash", "COMP_WORDS": "tinystory pr", "COMP_CWORD": "1"})
    assert set(r.stdout.split()) == {"prepare", "profiles"}
