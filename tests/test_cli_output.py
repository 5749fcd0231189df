"""What pcim prints where: quiet cron runs, plain lines off a terminal, NO_COLOR on one, --log-file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cli_runner import PCIM, pcim_env, run_pcim
from plates import make_plate

ESC = "\x1b["


def test_quiet_success_prints_nothing_and_log_file_gets_the_details(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",))
    log = tmp_path / "logs" / "run.log"
    proc = run_pcim("explain", str(plate), "-q", "--log-file", str(log))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # cron mails nothing on success
    text = log.read_text()
    assert "DEBUG" in text and "wrote 2 rows to" in text


@pytest.mark.slow
def test_off_a_terminal_lines_are_plain_and_timestamped(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"))
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 0, proc.stderr
    assert ESC not in proc.stderr and "\r" not in proc.stderr
    assert "wells 2/2 done, 0 failed" in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if " INFO " in ln]
    assert lines and all(ln[:4].isdigit() and ln[10] == " " for ln in lines)  # 2026-11-25 13:37:32 INFO …


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` (a pseudo-terminal) not installed")
def test_no_color_on_a_terminal_gives_plain_output(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",))
    command = " ".join([*PCIM, "explain", str(plate)])
    env = pcim_env(NO_COLOR="1", TERM="xterm-256color")
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "2 maps done" in proc.stdout and ESC not in proc.stdout
    fancy = subprocess.run(["script", "-qec", command + " --force", "/dev/null"], capture_output=True, text=True,
                           env=pcim_env(TERM="xterm-256color"), timeout=300)
    assert fancy.returncode == 0 and ESC in fancy.stdout  # the same run on a terminal without NO_COLOR is styled
