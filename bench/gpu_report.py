"""The short tables `bench/gpu_check.py` prints at the end of a run, from its results."""

from __future__ import annotations


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else (format(x, spec) if isinstance(x, (int, float)) else str(x))


def print_summary(results: dict) -> None:
    print("\n== summary ==")
    print(f"{'section':<17} {'ok':<3} {'s':>6}  note")
    for name, r in results.items():
        note = r.get("error", "")[:90] if not r.get("ok") else ""
        print(f"{name:<17} {'yes' if r.get('ok') else 'NO':<3} {r.get('seconds', 0):>6.1f}  {note}")
    env = results.get("environment", {})
    if env.get("ok"):
        print(f"\ntorch {env['torch']}  cuda {env['cuda']}  {env.get('device_name')}  "
              f"cap {env.get('capability')}  _scaled_mm {env['has_scaled_mm']}  "
              f"blockwise {env['has_blockwise_scaling_type']}")
    gemm = results.get("gemm_correctness", {})
    if gemm.get("ok"):
        print(f"\n{'GEMM M x K x N':<17} {'fmt':<10} {'scaling':<10} {'out':<8} {'path':<9} "
              f"{'err f64':>9} {'err emu':>9}")
        for c in gemm["cases"]:
            shape = "x".join(str(d) for d in c["shape"])
            if c["ok"]:
                print(f"{shape:<17} {c['fmt']:<10} {c['scaling']:<10} {c['out_dtype']:<8} {c['path']:<9} "
                      f"{c['rel_err_vs_f64']:>9.2e} {c['rel_err_vs_cpu_emulation']:>9.2e}")
            else:
                print(f"{shape:<17} {c['fmt']:<10} {c['scaling']:<10} {c.get('out_dtype', '-'):<8} "
                      f"{c.get('path', '-'):<9} ERROR {c['error'][:60]}")
    speed = results.get("gemm_speed", {})
    if speed.get("ok"):
        print(f"\n{'GEMM speed':<48} {'size':>5} {'ms':>9} {'TFLOP/s':>8}  path")
        for r in speed["rows"]:
            ms = _fmt(r["seconds"] * 1e3, ".3f") if r["ok"] else "ERROR"
            tf = _fmt(r.get("tflops"), ".1f")
            print(f"{r['op']:<48} {r['size']:>5} {ms:>9} {tf:>8}  {r.get('path', '')}"
                  + ("" if r["ok"] else f" {r['error'][:50]}"))
    lin = results.get("fp8_linear", {})
    if lin.get("ok"):
        print(f"\n{'FP8Linear':<26} {'err out':>9} {'err dgrad':>9} {'err wgrad':>9}  paths (fprop/dgrad/wgrad)")
        for c in lin["cases"]:
            label = f"{c['recipe']}/{c['fmt']} {c['dtype']}"
            if not c["ok"]:
                print(f"{label:<26} ERROR {c['error'][:70]}")
                continue
            e, p = c["rel_err"], c["paths"]
            print(f"{label:<26} {e['out']:>9.2e} {e['dgrad']:>9.2e} {e['wgrad']:>9.2e}  "
                  + "/".join(p.get(role, {}).get("path", "-") for role in ("fprop", "dgrad", "wgrad")))
    nccl = results.get("nccl", {})
    if nccl.get("ok"):
        print(f"\nNCCL/collectives ({nccl.get('backend')}): all_ok={nccl.get('all_ok')}")
        for key in ("process_group_transport", "forced_collectives"):
            for name, r in nccl.get(key, {}).items():
                status = f"ok exact={r.get('exact')}" if r["ok"] else "ERROR " + r["error"][:80]
                print(f"  {key}.{name}: {status}")
        raw = nccl.get("raw_collectives", {})
        print("  raw: " + ("ok" if raw.get("ok") else "ERROR " + raw.get("error", "")[:80]))
    train = results.get("training", {})
    if train.get("ok"):
        print(f"\n{'level':<12} {'first':>7} {'last20':>7} {'rel none':>8} {'step ms':>8} {'tok/s':>9} "
              f"{'maxmem MiB':>10} {'state B/p':>9} skip")
        for level, r in train["levels"].items():
            if not r.get("ok"):
                print(f"{level:<6} ERROR {r['error'][:80]}")
                continue
            mem = r.get("max_memory_allocated")
            delta = _fmt(r.get("last20_rel_vs_none"), "+.2%")
            print(f"{level:<12} {r['losses'][0]:>7.3f} {r['last20_mean']:>7.3f} {delta:>8} "
                  f"{r['median_step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9.0f} "
                  f"{_fmt(None if mem is None else mem / 2**20, '.0f'):>10} "
                  f"{r['memory_record']['state_bytes_per_param']:>9.2f} {r['skipped']}")
