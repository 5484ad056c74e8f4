"""``scripts/launch_overhead.py``: the Triton launchers' host time through the fake sm_90
driver (every launch compiled, none run), per launcher and per GPT step."""
import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "launch_overhead.py")
# launcher -> Triton launches per call (GPT-2-small rows: no flash-decoding, no autotune split)
LAUNCHES = {"layer_norm_forward": 1, "layer_norm_backward": 1, "attention_forward": 1,
            "attention_backward": 3, "cross_entropy_forward": 1, "feed_forward_forward": 2,
            "feed_forward_backward": 8}
ROW = re.compile(r"^(\w+)\s+([\d.]+)\s+([\d.]+)$")


def _run(tmp_path, env_update):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, SCRIPT, "--number", "2"], env=env,
                          capture_output=True, text=True, timeout=900)


def test_times_every_launcher_and_the_gpt_step(tmp_path):
    out = _run(tmp_path, {})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in map(ROW.match, out.stdout.splitlines()) if m}
    for name, launches in LAUNCHES.items():
        us, per_call = rows[name]
        assert us > 0 and per_call == launches, (name, rows[name])
    # 12 layers: 2 norms forward and backward, attention (1 + 3), feed-forward (2 + 8) each;
    # the final norm's forward and backward, the loss's forward and backward
    assert rows["triton"][1] == 12 * (4 + 4 + 10) + 2 + 2
    assert rows["cuda"][1] == 0 and rows["torch"][1] == 0
    assert all(rows[b][0] > 0 for b in ("triton", "cuda", "torch"))


def test_refuses_the_interpreter(tmp_path):
    out = _run(tmp_path, {"TRITON_INTERPRET": "1"})
    assert out.returncode == 2 and "unset TRITON_INTERPRET" in out.stderr
