"""The benchmark CLI and suite run end to end, and the zoo has the standard architectures' sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wavg_fused as wf
from wavg_fused.bench.cli import main
from wavg_fused.bench.peers import make_peers
from wavg_fused.bench.timing import count_launches, model_bytes
from wavg_fused.bench.zoo import build, gpt2, llama_1b3, resnet50, vit_b16

ROOT = Path(__file__).resolve().parents[1]


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def test_bench_prints_every_peer_and_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.json"
    assert main(["bench", "--models", "2000x1k", "--repeats", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    peers = [p.name for p in make_peers("cpu")]
    assert peers[:2] == ["blog loop", "AveragedModel"] and peers[-1] == "flat lerp_"
    timed = [b for b in wf.available_backends("cpu") if b != "triton"]  # not the interpreter
    expected = [f"wavg_fused[{b}]" for b in timed]
    expected.insert(1, f"wavg_fused[{timed[0]}] +guard")  # the non-finite guard's cost, on the fastest
    assert expected == [p for p in peers if p.startswith("wavg")]
    assert out.startswith("# wavg-fused bench:")
    for peer in peers:
        assert f"2000x1k    fp32      {peer} " in out
    assert f"2000x1k    bf16/fp32 {'AveragedModel':23s} n/a" in out
    data = json.loads(path.read_text())
    assert data["conditions"]["repeats"] == 2 and data["conditions"]["processor"]
    rows = data["results"]
    assert [r["peer"] for r in rows if r["variant"] == "fp32"] == peers
    for row in rows:
        assert row["model"] == "2000x1k" and row["numel"] == 2_000_000
        if row["variant"] == "bf16/fp32" and row["peer"] == "AveragedModel":
            assert "dtype" in row["unsupported"]
            continue
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["host_ms"] > 0 and row["launches"] >= 1
        assert (row["speedup"] is not None) == row["peer"].startswith("wavg_fused[")
        assert row["GBps"] > 0 and row["pct_copy_bw"] is None  # no copy bandwidth on the CPU
        assert row["bytes"] == 2_000_000 * (12 if row["variant"] == "fp32" else 10)
    limits = [r for r in rows if r["peer"] == "flat lerp_"]
    assert [r["pct_limit"] for r in limits] == [100.0, 100.0]
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_backend_is_one_launch_and_the_blog_loop_is_not():
    model = build("2000x1k")
    by_name = {p.name: p for p in make_peers("cpu")}
    for name in ("wavg_fused[cpu]", "blog loop", "AveragedModel"):
        by_name[name].setup(model, None)
        by_name[name].step(model)
    if "wavg_fused[cpu]" in by_name:
        assert count_launches(lambda: by_name["wavg_fused[cpu]"].step(model), cuda=False) == 1
    assert count_launches(lambda: by_name["blog loop"].step(model), cuda=False) >= 2000


def test_bench_rejects_unknown_model_and_variant():
    with pytest.raises(SystemExit):
        main(["bench", "--models", "resnet18"])
    with pytest.raises(SystemExit):
        main(["bench", "--variants", "fp8"])


def test_plot_subcommand_redraws(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.json"
    assert main(["bench", "--models", "2000x1k", "--variants", "fp32", "--repeats", "1", "--json", str(path)]) == 0
    out = tmp_path / "again.png"
    assert main(["plot", str(path), "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_pytest_benchmark_suite_runs():
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, WAVG_BENCH_MODELS="2000x1k", WAVG_BENCH_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 skipped" in result.stdout  # AveragedModel cannot hold an fp32 average of a bf16 model


def test_model_bytes_counts_the_fewest_bytes_an_update_moves():
    model = torch.nn.BatchNorm1d(10)  # 2 parameters and 2 float buffers of 10, one int64 counter
    assert model_bytes(model, None) == 20 * 12 + 20 * 8 + 16
    assert model_bytes(model.to(torch.bfloat16), torch.float32) == 20 * 10 + 20 * 6 + 16


def test_zoo_models_are_random_not_zero():
    model = build("resnet50", dtype=torch.bfloat16)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            assert tensor.dtype == torch.bfloat16 and bool((tensor != 0).all())


def test_resnet50_has_torchvision_shapes():
    model = resnet50()
    assert _numel(model) == 25_557_032
    assert len(list(model.parameters())) == 161
    names = dict(model.named_buffers())
    assert len(names) == 3 * 53 and names["layer4.2.bn3.running_var"].shape == (2048,)
    assert dict(model.named_parameters())["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)


def test_vit_b16_has_standard_shapes():
    model = vit_b16()
    assert _numel(model) == 86_567_656
    params = dict(model.named_parameters())
    assert params["pos_embed"].shape == (1, 197, 768)
    assert params["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert params["head.weight"].shape == (1000, 768)


def test_gpt2_has_standard_shapes_and_a_tied_head():
    with torch.device("meta"):
        model = gpt2()
    assert _numel(model) == 124_439_808 and len(list(model.parameters())) == 148
    assert model.lm_head.weight is model.transformer["wte"].weight
    params = dict(model.named_parameters())
    assert params["transformer.h.11.attn.c_attn.weight"].shape == (768, 2304)
    assert params["transformer.wpe.weight"].shape == (1024, 768)


def test_llama_1b3_has_its_config_sizes():
    with torch.device("meta"):
        model = llama_1b3()
    assert _numel(model) == 1_345_423_360 and len(list(model.parameters())) == 219
    params = dict(model.named_parameters())
    assert params["model.layers.23.mlp.gate_proj.weight"].shape == (5504, 2048)
    assert params["lm_head.weight"].shape == (32000, 2048)
