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
from wavg_fused.bench.limit import FlatOp, limit_row, make_proxies
from wavg_fused.bench.peers import make_peers
from wavg_fused.bench.report import load_results, markdown_table
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
    timed = [b for b in wf.available_backends("cpu") if b != "triton"]  # not the interpreter
    proxies = [p for p in peers if p.startswith("flat ")]
    shown = [p for p in peers if p not in proxies] + ["limit"]  # the proxies fold into one limit row
    assert peers[:2] == ["blog loop", "AveragedModel"] and peers[-len(proxies):] == proxies
    assert proxies == ["flat lerp_", "flat add_", "flat copy_", f"flat wavg_fused[{timed[0]}]"]
    expected = [f"wavg_fused[{b}]" for b in timed]
    expected.insert(1, f"wavg_fused[{timed[0]}] +guard")  # the non-finite guard's cost, on the fastest
    assert expected == [p for p in peers if p.startswith("wavg")]
    assert out.startswith("# wavg-fused bench:")
    for peer in shown:
        assert f"2000x1k    fp32      {peer} " in out
    assert f"2000x1k    bf16/fp32 {'AveragedModel':23s} n/a" in out
    assert out.count("# limit = flat ") == 2
    data = json.loads(path.read_text())
    assert data["conditions"]["repeats"] == 2 and data["conditions"]["processor"]
    rows = data["results"]
    assert [r["peer"] for r in rows if r["variant"] == "fp32"] == shown
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
    limits = [r for r in rows if r["peer"] == "limit"]
    assert [r["pct_limit"] for r in limits] == [100.0, 100.0]
    for limit in limits:  # the fastest proxy of its case, each proxy's time kept
        assert list(limit["proxies"]) == proxies
        assert limit["median_ms"] == min(limit["proxies"].values()) == limit["proxies"][limit["proxy"]]
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["fp32", "bf16/fp32"])
def test_every_proxy_of_the_limit_moves_the_update_bytes(variant):
    model = torch.nn.Sequential(torch.nn.Linear(37, 101), torch.nn.BatchNorm1d(101))
    shadow_dtype = None
    if variant == "bf16/fp32":
        model, shadow_dtype = model.to(torch.bfloat16), torch.float32
    nbytes = model_bytes(model, shadow_dtype)
    proxies = make_proxies("torch")
    for proxy in proxies:
        proxy.setup(model, shadow_dtype)
        proxy.step(model)
        # whole elements of the proxy's pattern: at most one element's bytes short
        per_element = proxy.bytes_per_element if isinstance(proxy, FlatOp) else (12 if variant == "fp32" else 10)
        assert nbytes - per_element < proxy.nbytes <= nbytes, proxy.name
    flat = proxies[0]
    assert flat.out.data_ptr() == proxies[1].out.data_ptr()  # one pair of buffers for all: memory


def test_limit_row_is_the_fastest_candidate_and_keeps_them_all():
    rows = [{"peer": name, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "host_ms": ms, "launches": 1}
            for name, ms in [("flat lerp_", 3.0), ("flat add_", 2.0), ("flat copy_", 4.0)]]
    row = limit_row(rows)
    assert (row["peer"], row["proxy"], row["median_ms"]) == ("limit", "flat add_", 2.0)
    assert row["proxies"] == {"flat lerp_": 3.0, "flat add_": 2.0, "flat copy_": 4.0}
    gpu = limit_row(rows, {"copy bandwidth": 1.5})  # a GPU's measured copy bandwidth is a limit too
    assert (gpu["proxy"], gpu["median_ms"], gpu["launches"]) == ("copy bandwidth", 1.5, 0)
    assert limit_row(rows, {"copy bandwidth": 9.0})["proxy"] == "flat add_"
    with pytest.raises(ValueError, match="proxy_rows"):
        limit_row([])


def test_table_bolds_only_the_fastest_wavg_fused_row_and_reads_old_results():
    # written when the limit was 'flat lerp_' alone, before the limit row had its proxies
    table = markdown_table(load_results(str(ROOT / "benchmarks/results/cpu-2core-2026-11-25.json")))
    header, _, *rows = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "flat lerp_" not in columns and columns[-2] == "limit"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        bold = [columns[i] for i, c in enumerate(cells) if c.startswith("**")]
        times = {columns[i]: float(c.strip("*").split()[0]) for i, c in enumerate(cells)
                 if columns[i].startswith("wavg_fused") and c != "n/a"}
        assert bold == [min(times, key=times.get)], row
        assert cells[-2].endswith("(flat lerp_)")


def test_table_bolds_nothing_when_a_peer_is_faster():
    rows = [{"model": "m", "variant": "fp32", "peer": p, "median_ms": t, "pct_limit": 100 / t, "speedup": None}
            for p, t in [("timm", 1.5), ("wavg_fused[cpu]", 2.0), ("limit", 1.0)]]
    assert "**" not in markdown_table({"results": rows})


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


# --- arguments checked before the benchmark runs; clear one-line errors; non-zero exits ---

def _no_benchmark(*args, **kwargs):
    raise AssertionError("the benchmark ran before its arguments were checked")


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_bench_rejects_plot_it_cannot_save_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("wavg_fused.bench.cli.bench_case", _no_benchmark)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--models", "2000x1k", "--no-save", "--plot", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    _one_line_error(capsys, "--plot", "--no-save")


def test_bench_rejects_json_in_a_missing_folder_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("wavg_fused.bench.cli.bench_case", _no_benchmark)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--models", "2000x1k", "--json", str(tmp_path / "missing" / "r.json")])
    assert exit_.value.code == 2
    _one_line_error(capsys, "--json", "missing")


def _results_file(tmp_path):
    rows = [{"model": "m", "variant": "fp32", "peer": p, "median_ms": t, "p10_ms": t, "p90_ms": t,
             "pct_limit": 100 / t, "speedup": s} for p, t, s in
            [("timm", 4.0, None), ("wavg_fused[cpu]", 2.0, 2.0), ("limit", 1.0, None)]]
    conditions = {"device": "cpu", "threads": 2, "torch": "x", "date": "2026-01-01", "method": "EMA"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"conditions": conditions, "results": rows}))
    return path


def test_plot_without_matplotlib_fails(tmp_path, monkeypatch, capsys):
    path = _results_file(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is missing
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(SystemExit) as exit_:
        main(["plot", str(path)])
    assert exit_.value.code == 1
    _one_line_error(capsys, "matplotlib")
    assert not path.with_suffix(".png").exists()


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("wavg_fused.bench.cli.bench_case", _no_benchmark)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--models", "2000x1k", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert exit_.value.code == 1
    _one_line_error(capsys, "matplotlib")


@pytest.mark.parametrize("content", [None, "{}", "not json", '{"results": [{"peer": "x"}]}'],
                         ids=["missing", "empty-object", "not-json", "rows-without-fields"])
@pytest.mark.parametrize("command", ["table", "plot"])
def test_table_and_plot_reject_a_file_that_is_not_results(tmp_path, capsys, command, content):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main([command, str(path)])
    assert exit_.value.code == 2
    _one_line_error(capsys, str(path))


def test_bench_outside_the_repository_saves_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no benchmarks/results here
    assert main(["bench", "--models", "2000x1k", "--variants", "fp32", "--repeats", "1"]) == 0
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1 and saved[0].name.startswith("cpu-")
    assert f"# wrote {saved[0].name}" in capsys.readouterr().out
    assert json.loads(saved[0].read_text())["results"]


def test_bench_says_when_it_saves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--models", "2000x1k", "--variants", "fp32", "--repeats", "1", "--no-save"]) == 0
    assert "# not saved (--no-save)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
