"""Data parallelism through accelerate: 2 processes on the CPU (gloo), each with half of every
global batch, take the same steps as 1 process with the whole batch (scripts/ddp_lora.py), both
with DDP (each process holds the whole model) and with FSDP2 (torch's fully_shard: each holds half)."""
import contextlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import labkit as lk
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ddp_lora.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd, out, *extra):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        done = subprocess.run(cmd + [str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
        # a known intermittent crash of a process at exit ("terminate called without an active exception",
        # seen in about one FSDP run in several on the 2-core machines): run it once more, say so, and
        # check the second run's output in full; any other failure fails at once
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr or attempt:
            break
        print("ddp_lora.py crashed at exit (terminate called without an active exception); running it again")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "losses.json").read_text()), load_file(out / "adapter.safetensors")


def initial_adapter():
    """The adapter as the script starts it: the toy Llama of seed 0, LoRA injected after seed 0."""
    model = lk.tiny_llama(seed=0)
    torch.manual_seed(0)
    return lk.lora_state_dict(lk.inject_lora(model, lk.lora.QKVO, r=4, alpha=8))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    require("accelerate")                                 # before the script runs, not after
    return run([sys.executable], tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("route", ["ddp", "fsdp"])
def test_two_processes_take_the_same_steps_as_one(tmp_path, one_process, route):
    """DDP (every process holds the whole model) and FSDP2 (torch's fully_shard: each holds half of
    every weight) must both take one process's steps, and save an adapter lk.load_adapter loads."""
    one, one_weights = one_process
    two, two_weights = run(LAUNCH, tmp_path / "two", *(["--fsdp"] if route == "fsdp" else []))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["sharded"] == (route == "fsdp") and not one["sharded"]
    # FSDP: each process holds half of every weight (all of the toy model's sizes are even); DDP: all
    assert two["held_bytes"] == (one["full_bytes"] // 2 if route == "fsdp" else one["full_bytes"])
    # The same sums in another order (each process sums its half; the halves are then averaged):
    # the losses (about 5.6) differ by ~1e-6. AdamW divides each gradient by its own running size, so
    # where a gradient is near zero such differences can move a weight by a visible part of a step
    # (lr = 1e-2): measured 5.8e-5 at worst; 0.3% of all entries differ by more than 1e-6. Hence:
    # within 1% of one step everywhere, and within 1e-6 on all but 1% of the entries (all tensors).
    lr = 1e-2
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
    start = initial_adapter()
    assert one_weights.keys() == two_weights.keys() == start.keys()
    for k, w in one_weights.items():
        assert (w - start[k]).abs().max() > lr, k                     # trained: A and B (B starts at 0) moved
        torch.testing.assert_close(two_weights[k], w, rtol=0, atol=1e-2 * lr)
    apart = torch.cat([(two_weights[k] - w).abs().flatten() for k, w in one_weights.items()])
    assert (apart > 1e-6).float().mean() < 0.01
    loaded = lk.lora_state_dict(lk.load_adapter(lk.tiny_llama(seed=0), tmp_path / "two" / "adapter.safetensors"))
    assert loaded.keys() == two_weights.keys() and all(torch.equal(loaded[k], w) for k, w in two_weights.items())


class RecordingAccelerator:
    """A one-process stand-in for accelerate's Accelerator that records what the script asks of it."""
    events = []
    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    def __init__(self, **kwargs):
        pass

    @contextlib.contextmanager
    def main_process_first(self):
        self.events.append("main process first")
        yield
        self.events.append("then the others")

    def prepare(self, *things):
        return things

    def backward(self, loss):
        loss.backward()

    def reduce(self, tensor, reduction):
        return tensor

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass

    def end_training(self):
        self.events.append("end_training")              # destroys the process group


def test_the_main_process_loads_first_and_the_process_group_ends(tmp_path, monkeypatch):
    """On a fresh cache lk.load_model converts the weights into it: the main process must load first
    (the others then read its files instead of writing the same ones at once), and the process group
    must be destroyed at the end. Run in this process, with a stand-in that records the order."""
    accelerate = require("accelerate")
    events = RecordingAccelerator.events = []
    monkeypatch.setattr(accelerate, "Accelerator", RecordingAccelerator)
    real = lk.tiny_llama
    monkeypatch.setattr(lk, "tiny_llama", lambda **kwargs: events.append("load") or real(**kwargs))
    monkeypatch.setattr(sys, "argv", ["ddp_lora.py", "--out", str(tmp_path), "--steps", "1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert events == ["main process first", "load", "then the others", "end_training"]
    lk.load_adapter(real(seed=0), tmp_path / "adapter.safetensors")


def test_without_accelerate_the_script_says_what_to_install(tmp_path):
    code = ("import sys, runpy; sys.modules['accelerate'] = None; "
            f"sys.argv = ['ddp_lora.py', '--out', {str(tmp_path)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "needs accelerate: pip install accelerate" in done.stderr


@pytest.mark.parametrize("name, kind, processes", [("one_gpu", "NO", 1), ("ddp", "MULTI_GPU", 2), ("fsdp", "FSDP", 2)])
def test_the_shipped_accelerate_configs_are_what_they_say(name, kind, processes):
    """They are only read here (this machine has no GPU): accelerate must accept every key."""
    require("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.name, config.num_processes, config.mixed_precision) == (kind, processes, "bf16")
    if kind == "FSDP":
        # FSDP2 (fully_shard, what scripts/ddp_lora.py --fsdp runs), not FSDP1's flat parameters: frozen and
        # trained weights share a layer without FSDP1's use_orig_params, which FSDP2 has no key for
        assert config.fsdp_config["fsdp_version"] == 2
        assert "fsdp_use_orig_params" not in config.fsdp_config
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
