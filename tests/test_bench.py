"""The benchmark and profiling CLIs on the CPU: `scripts/bench.py --model` rows and summary, `scripts/profile_step.py`.
(Each op's benchmark is tested beside its op; bad input to both CLIs in `test_bad_inputs.py`.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.scripts import load_script as script


@pytest.mark.parametrize("tokens", [None, 128])
def test_model_benchmark_rows_and_cost_per_token(tokens: int | None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Optimized rows at each length, the reference at its length, the ratio line and the per-token growth line;
    with `--tokens-per-step` the batch is N // L at each length (same tokens per step)."""
    argv = ["--model", "gru", "--quick", "--seq-lens", "32", "64", "--ref-seq-lens", "32", "--repeat", "1",
            "--device", "cpu", "--json", str(tmp_path / "rows.json")]
    if tokens is not None:
        argv += ["--tokens-per-step", str(tokens)]
    assert script("bench").main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    expected = {32: 4, 64: 2} if tokens else {32: 2, 64: 2}
    optimized = {r["params"] for r in rows if r["impl"] == "optimized"}
    assert optimized == {f"B={b} L={length}" for length, b in expected.items()}
    assert [r["params"] for r in rows if r["impl"] == "reference"] == [f"B={expected[32]} L=32"]
    for r in rows:
        b, length = (int(v.split("=")[1]) for v in r["params"].split())
        assert r["throughput"] == f"{b * length / (r['ms'] / 1e3):,.0f} tok/s"
    assert re.search(rf"model:gru B={expected[32]} L=32: optimized [0-9.]+x the reference's tokens/s", out), out
    assert re.search(r"cost per token relative to L=32 \(eager fp32\): L=32: 1\.00, L=64: [0-9.]+", out), out


def test_profile_step_prints_the_step_time_and_the_top_ops(capsys: pytest.CaptureFixture[str]) -> None:
    status = script("profile_step").main(["--model", "gru", "--seq-len", "8", "--batch-size", "1", "--rows", "3",
                                          "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"# gru optimized eager B=1 L=8 on cpu: [0-9.]+ ms per step", out), out
    # on the CPU the host runs every op itself: it returns when the step is done
    host = re.search(r"# host issued the step in ([0-9.]+) ms of its ([0-9.]+) ms", out)
    assert host and 0 < float(host[1]) <= float(host[2]) + 0.1, out
    assert "Self CPU" in out and "aten::" in out, out


def test_model_benchmark_compile_mode_reaches_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile-mode reduce-overhead` is the mode each compile row hands `torch.compile` (stubbed here: the CPU
    machine has no CUDA graphs to replay), and the rows name it; the default mode leaves the label plain."""
    import torch

    seen: list[str | None] = []

    def fake_compile(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
        seen.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    for mode, label in (("reduce-overhead", "compile[reduce-overhead]"), ("default", "compile")):
        seen.clear()
        argv = ["--model", "gru", "--seq-lens", "16", "--batch-size", "1", "--no-reference", "--repeat", "1",
                "--device", "cpu", "--compile-mode", mode, "--json", str(tmp_path / f"{mode}.json")]
        assert script("bench").main(argv) == 0
        rows = json.loads((tmp_path / f"{mode}.json").read_text())["rows"]
        assert sorted(r["dispatch"] for r in rows) == sorted(["eager", label])
        assert seen == [None if mode == "default" else mode]
