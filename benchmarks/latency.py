"""Latency and size of fp32 vs int8 for each torch.ao backend and flow: `make bench-backends`, whose table the docs
include.

Run with ``make bench-backends``. Prints one Markdown table; timings are medians of repeated forward
passes after a warm-up, with torch's default thread count on this machine.
"""

from __future__ import annotations

import argparse
import copy

import torch
from publish import publish

from lightning_quant.demos import DigitsCNN
from lightning_quant.evaluation import latency_ms, state_dict_bytes
from lightning_quant.quantization import ExampleInputs, QuantizationConfig, convert_copy, get_flow
from lightning_quant.utils import format_table, speed_change
from lightning_quant.utils.timing import machine_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=8, help="8 for digits, 28 for MNIST")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--publish", help="also write the table to this Markdown file (make bench-backends does)")
    args = parser.parse_args()

    torch.manual_seed(0)
    float_net = DigitsCNN(width=args.width).eval()
    calibration = torch.rand(256, 1, args.image_size, args.image_size)
    example = ExampleInputs((calibration[:32],))
    rows = []
    for flow in ("fx", "eager"):
        for backend in ("x86", "fbgemm", "qnnpack"):
            config = QuantizationConfig(backend=backend, flow=flow)
            prepared = get_flow(flow).prepare(copy.deepcopy(float_net), config, example, qat=False)
            with torch.no_grad():
                prepared(calibration)
            int8 = convert_copy(prepared, flow, config.engine)
            row = [flow, backend, f"{state_dict_bytes(float_net) / state_dict_bytes(int8):.2f}x"]
            for batch in (1, 32):
                fp32 = latency_ms(float_net, example, batch, args.repeats)
                q = latency_ms(int8, example, batch, args.repeats, engine=config.engine)
                row += [f"{fp32:.3f}", f"{q:.3f}", speed_change(fp32, q)]
            rows.append(row)
    headers = (
        "flow",
        "backend",
        "size fp32/int8",
        "fp32 b1 ms",
        "int8 b1 ms",
        "int8 vs fp32 b1",
        "fp32 b32 ms",
        "int8 b32 ms",
        "int8 vs fp32 b32",
    )
    heading = f"DigitsCNN(width={args.width}) on {args.image_size}x{args.image_size} inputs; {machine_description()}"
    table = format_table(headers, rows)
    print(heading)
    print(table)
    command = (
        "make bench-backends"
        if args.image_size == 8
        else f"python benchmarks/latency.py --image-size {args.image_size}"
    )
    publish(args.publish, f"{heading}\n\n{table}", command)


if __name__ == "__main__":
    main()
