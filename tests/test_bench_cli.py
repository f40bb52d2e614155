"""The benchmark CLI runs end to end, and its zoo has the standard architectures' sizes."""

import json

import pytest

import wavg_fused as wf
from wavg_fused.bench.cli import main
from wavg_fused.bench.peers import make_peers
from wavg_fused.bench.zoo import resnet50, vit_b16


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def test_bench_quick_prints_every_peer_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--models", "2000x1k", "--repeats", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    peers = [p.name for p in make_peers("cpu")]
    assert peers[:2] == ["blog loop", "AveragedModel"] and peers[-1] == "flat lerp_"
    assert [f"wavg_fused[{b}]" for b in wf.available_backends("cpu")] == [p for p in peers if p.startswith("wavg")]
    assert out.startswith("# wavg-fused bench:")
    for peer in peers:
        assert f"2000x1k    {peer} " in out
    data = json.loads(path.read_text())
    assert data["conditions"]["repeats"] == 2
    assert [row["peer"] for row in data["results"]] == peers
    for row in data["results"]:
        assert row["model"] == "2000x1k" and row["numel"] == 2_000_000
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert (row["speedup"] is not None) == row["peer"].startswith("wavg_fused[")
        assert row["GBps"] > 0 and row["pct_copy_bw"] is None  # no copy bandwidth on the CPU


def test_bench_rejects_unknown_model():
    with pytest.raises(SystemExit):
        main(["bench", "--models", "resnet18"])


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
