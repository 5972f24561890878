import json
import subprocess
import sys

from stepflash.accounting import flops_per_token, kv_cache_bytes, param_counts
from stepflash.config import flash, tiny


def test_flash_counts_match_spec():
    c = param_counts(flash())
    assert round(c["trunk_params"] / 1e9, 2) == 196.96
    assert round(c["mtp_params_per_module"] / 1e9, 2) == 0.81
    assert round(c["total_params"] / 1e9, 2) == 199.38
    assert round(c["active_params"] / 1e9, 2) == 10.93
    assert round(c["active_params_with_head"] / 1e9, 2) == 11.46


def test_kv_bytes_match_spec_arithmetic():
    cfg = flash()
    per_layer = 8 * 128 * 2 * 2  # 4 KiB per layer per token
    assert kv_cache_bytes(cfg, 100) == 45 * 100 * per_layer
    assert kv_cache_bytes(cfg, 8192) == (12 * 8192 + 33 * 512) * per_layer


def test_flops_formula_on_tiny():
    cfg = tiny()
    counts = param_counts(cfg)
    f = flops_per_token(cfg, 1)
    # at context 1 every layer sees one key: 2 * 2 * heads * head_dim per layer
    attn = sum(4 * cfg.num_heads(i) * cfg.head_dim_of(i) for i in range(cfg.num_hidden_layers))
    assert f["decode_flops"] == 2 * counts["active_params_with_head"] + attn


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "stepflash.cli", "info", "tiny", "--json", "--context", "64"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    for key in ("total_params", "trunk_params", "mtp_params", "active_params", "kv_bytes_per_token"):
        assert key in d
    assert d["layouts"]["S3F1"]["decode_ratio"] == 1.0
    assert d["layouts"]["FFFF"]["decode_ratio"] > 1.0
