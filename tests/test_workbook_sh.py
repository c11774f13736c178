"""The README's first command: `bash scripts/workbook.sh lab` brings up JupyterLab, as root too
(Docker containers, cloud machines, this project's machines), with JupyterLab's own arguments
passed through. The test starts it on loopback, asks the server's API, then stops it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, args, extra_env=()):
    """Run `workbook.sh lab ARGS` until JupyterLab answers on loopback, then stop it: (answer, log)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LABKIT_SYSTEM_PYTHON", "COLAB_RELEASE_TAG")}
    env.update({"LABKIT_VENV": sys.prefix, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_PORT": str(port),
                "BROWSER": "true"}, **dict(extra_env))       # BROWSER: "open" a page with /bin/true
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(["bash", "scripts/workbook.sh", *[a.replace("PORT", str(port)) for a in args]],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, answer = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=5) as r:
                    answer = json.load(r)
                break
            except OSError:
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return answer, (tmp_path / "lab.log").read_text()


def test_lab_command_passes_jupyterlabs_arguments_and_starts_as_root(tmp_path):
    answer, out = _serve(tmp_path, ["lab", "--no-browser", "--ip", "127.0.0.1", "--port", "PORT",
                                    "--ServerApp.port_retries=0"], {"JUPYTER_PORT": "1"})   # --port must win
    assert answer is not None and "version" in answer, out[-3000:]
    assert "Running as root is not recommended" not in out


def test_the_bare_command_opens_the_workbook(tmp_path):
    """`bash scripts/workbook.sh` with no argument means `lab`: the README's first command."""
    answer, out = _serve(tmp_path, [])
    assert answer is not None and "version" in answer, out[-3000:]
