"""Compile-only dry run on 8 virtual CPU devices (in a subprocess)."""

from grok1 import plan


def test_dry_run_tiny_config_on_8_virtual_devices():
    r = plan.dry_run_subprocess(
        "tiny", {"data": 4, "model": 2}, batch=4, context=64, timeout=240, layers=2
    )
    assert r["mesh"] == {"data": 4, "model": 2}
    for name in ("decode", "prefill"):
        assert r[name]["compile_s"] > 0
        assert r[name]["memory"]["total"] > 0
        # every device holds at least its share of the parameters
        assert r[name]["memory"]["argument"] >= r["param_bytes_per_device"]
    assert r["decode"]["tokens"] == 1 and r["prefill"]["tokens"] == 64
    assert r["needed_bytes_per_device"] >= r["param_bytes_per_device"] > 0
    assert r["cache_bytes_per_device"] > 0
