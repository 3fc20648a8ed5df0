"""The summary scripts/gpu_check.sh prints last: each benchmark's figures from the JSON in OUT, against
the goals the hardware map sets on an H100/H200 (soft-capped attention forward+backward >= 0.8x SDPA's
flash path without a cap; batch-1 bf16 decode >= 80% of the measured memory bandwidth; training MFU >= 45%
dense, >= 30% MoE, against the card's bf16 peak).

    python scripts/gpu_summary.py OUT
"""

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def goal(value: float | None, bar: float) -> str:
    return "n/a" if value is None else ("meets" if value >= bar else "below") + f" the goal of {bar:g}"


def kernels(report: dict) -> None:
    print(f"kernels on {report['device']}:")
    for op in report["ops"]:
        if op["seconds"] is None:
            print(f"  {op['op']}: unavailable ({op.get('unavailable', 'no reason given')})")
            continue
        line = f"  {op['op']}: {op['seconds'] * 1e3:.3f} ms, x{op['speedup_over_baseline']:.2f} over {op['baseline']}"
        ratio = op.get("ratio_to_sdpa_without_cap")
        if ratio is not None:
            line += f", {ratio:.2f} of SDPA without a cap"
            if "backward" in op["op"]:
                line += f" ({goal(ratio, 0.8)})"
        print(line)


def train(report: dict) -> None:
    print(f"train on {report['device']} (matmul {report['ceiling']['matmul_flops'] / 1e12:.0f} TFLOP/s measured):")
    for r, bar in zip(report["results"], (0.45, 0.30), strict=True):
        f, b = r["flatstack"], r["baseline"]
        card = f.get("mfu_of_card_peak")
        print(f"  {r['model']} {r['params'] / 1e9:.2f}B: {f['tokens_per_s']:.0f} tok/s, MFU {f['mfu']:.1%} of the "
              f"measured rate" + (f", {card:.1%} of the card's peak ({goal(card, bar)})" if card else "")
              + f"; baseline {b['tokens_per_s']:.0f} tok/s, x{r['speedup']:.2f}")


def decode(report: dict) -> None:
    f = report["flatstack"]
    ratio = f"; x{report['ratio']:.2f} transformers" if "ratio" in report else ""
    print(f"decode batch 1: {f['decode_tokens_per_s']:.0f} tok/s = {f['fraction_of_roofline']:.1%} of the "
          f"{report['ceiling']['memory_read_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s roofline "
          f"({goal(f['fraction_of_roofline'], 0.8)}){ratio}")


def throughput(report: dict) -> None:
    f = report["flatstack"]
    print(f"throughput {report['requests']} requests: {f['output_tokens_per_s']:.0f} output tok/s, MFU {f['mfu']:.1%}"
          + (f"; x{report['ratio']:.2f} transformers" if "ratio" in report else ""))


def fsdp(out: Path) -> None:
    path = out / "fsdp-run" / "metrics.jsonl"
    if not path.exists():
        print("fsdp: no run")
        return
    steps = [json.loads(line) for line in path.read_text().splitlines() if '"tokens_per_s"' in line]
    last = steps[-1]
    print(f"fsdp, one rank under torchrun: step {last['step']}, loss {last['loss']:.3f}, "
          f"{last['tokens_per_s']:.0f} tok/s (the last step)")


def main() -> None:
    out = Path(sys.argv[1])
    print("--- summary ---")
    for name, show in (("kernels", kernels), ("train", train), ("decode", decode), ("throughput", throughput)):
        report = load(out, name)
        if report is None:
            print(f"{name}: no report")
        else:
            show(report)
    fsdp(out)


if __name__ == "__main__":
    main()
