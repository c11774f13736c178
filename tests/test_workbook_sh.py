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


def test_lab_command_serves_jupyterlab_on_loopback_and_stops(tmp_path):
    port = _free_port()
    env = {**os.environ, "LABKIT_VENV": sys.prefix, "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(["bash", "scripts/workbook.sh", "lab", "--no-browser", "--ip", "127.0.0.1",
                             "--port", str(port), "--ServerApp.port_retries=0"],
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
        out = (tmp_path / "lab.log").read_text()
        assert answer is not None, f"JupyterLab did not answer on port {port} (exit {proc.poll()}):\n{out[-3000:]}"
        assert "version" in answer
        assert "Running as root is not recommended" not in out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.poll() is not None
