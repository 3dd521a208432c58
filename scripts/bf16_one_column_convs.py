#!/usr/bin/env python3
"""Which bfloat16 convolutions oneDNN gets wrong on this CPU, and what the guard costs.

    python3 scripts/bf16_one_column_convs.py

Sweeps ``nn.Conv2d`` in bfloat16 (input channels 3 / 64 / 128, output channels 64 / 128, kernels
1 / 3 / 5 / 7 with padding k // 2, horizontal and vertical strides 1-3, input widths 1-8, heights
4 and 15, channels-last and NCHW), and depthwise ones (16-144 channels, kernels 3 / 5, strides 2-3). Before each case the allocator gets freed tensors of 1e30, so
a kernel that writes less than its whole output shows it. Each output is compared with the same
convolution with oneDNN off (PyTorch's own bfloat16 kernel); a case is wrong when they differ by
1 or more. Prints the wrong cases counted by (stride, output width), then whether
:func:`~mpvss_ros.runtime.torch_backend.run_in_bf16`'s guard puts every wrong case right, and
the best of five timeit rounds of the guard's check on a convolution it leaves alone.
docs/runtime.md, "bf16 on CPU"; docs/experiment_log.md, "Stop 41".
"""

from __future__ import annotations

import collections
import itertools
import sys
import timeit

import torch

from mpvss_ros.runtime.torch_backend import (_conv_output_length, _one_column_guard_off, _one_column_guard_on,
                                             bf16_missing, run_in_bf16)


def _fill_freed_memory() -> None:
    junk = [torch.full((1 << 16,), 1e30, dtype=torch.bfloat16) for _ in range(20)]
    del junk


def _with_and_without_onednn(conv: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv(x)`` as float32 with oneDNN (freed memory filled first) and with it off."""
    with torch.inference_mode():
        _fill_freed_memory()
        out = conv(x).float()
        with torch.backends.mkldnn.flags(enabled=False):
            ref = conv(x).float()
    return out, ref


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not float((a - b).abs().max()) < 1.0


def main() -> int:
    if bf16_missing() is not None:
        print(f"bf16 is not available here: {bf16_missing()}", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layouts = {"NHWC": torch.channels_last, "NCHW": torch.contiguous_format}
    cases = wrong = 0
    by_shape: collections.Counter[tuple[int, int]] = collections.Counter()
    still_wrong = 0
    for cin, cout, k, s, w, h, name in itertools.product((3, 64, 128), (64, 128), (1, 3, 5, 7), (1, 2, 3), range(1, 9),
                                                         (4, 15), layouts):
        p = k // 2
        ow = _conv_output_length(w, k, s, p)
        if ow < 1 or _conv_output_length(h, k, s, p) < 1:
            continue
        cases += 1
        conv = torch.nn.Conv2d(cin, cout, k, s, p).to(torch.bfloat16, memory_format=layouts[name])
        x = torch.randn(1, cin, h, w).to(torch.bfloat16).contiguous(memory_format=layouts[name])
        out, ref = _with_and_without_onednn(conv, x)
        if _differs(out, ref):
            wrong += 1
            by_shape[(s, ow)] += 1
            guarded = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, s, p))
            guarded[0].load_state_dict({n: t.float() for n, t in conv.state_dict().items()})
            run_in_bf16(guarded, layouts[name])
            with torch.inference_mode():
                _fill_freed_memory()
                still_wrong += _differs(guarded(x.float()), ref)
    print(f"torch {torch.__version__}: {wrong} of {cases} bfloat16 convolutions wrong with oneDNN")
    for (s, ow), n in sorted(by_shape.items()):
        print(f"  stride {s}, output width {ow}: {n}")
    print(f"with run_in_bf16's guard: {still_wrong} wrong")
    dw_cases = dw_wrong = 0  # depthwise (MobileNetV2's strided convolutions), the guard not needed
    for c, k, s, w, h, name in itertools.product((16, 32, 96, 144), (3, 5), (2, 3), range(1, 9), (4, 15), layouts):
        p = k // 2
        if _conv_output_length(w, k, s, p) < 1:
            continue
        dw_cases += 1
        conv = torch.nn.Conv2d(c, c, k, s, p, groups=c).to(torch.bfloat16, memory_format=layouts[name])
        x = torch.randn(1, c, h, w).to(torch.bfloat16).contiguous(memory_format=layouts[name])
        dw_wrong += _differs(*_with_and_without_onednn(conv, x))
    print(f"depthwise (groups = channels), strides 2-3, widths 1-8: {dw_wrong} of {dw_cases} wrong with oneDNN")
    conv, x = torch.nn.Conv2d(64, 96, 3, 2, 1), torch.randn(1, 64, 60, 80)
    n = 20000
    t = min(timeit.repeat(lambda: (_one_column_guard_on(conv, (x,)), _one_column_guard_off(conv, (x,), None)),
                          number=n, repeat=5)) / n
    print(f"the guard's check on a strided convolution it leaves alone: {t * 1e6:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
