"""Device strings (mpvss_ros.devices): the grammar the node, the command line and the backends share."""

import pytest
import torch

from mpvss_ros.devices import MAX_CUDA_INDEX, as_torch_device, check_device


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:9", "cuda:10", f"cuda:{MAX_CUDA_INDEX}"])
def test_the_accepted_device_strings(device):
    assert check_device(device) == device


@pytest.mark.parametrize("device", ["gpu", "meta", "mps", "cpu:0", "CUDA", "cuda:", "cuda0", "cuda:007", "cuda:-1",
                                    "cuda: 1", " cuda", "cuda:1\n", "cuda:\u0663", "", 0, None, b"cpu", ["cpu"]])
def test_other_strings_and_types_are_named(device):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got "):
        check_device(device)


@pytest.mark.parametrize("index", [MAX_CUDA_INDEX + 1, 255, 256, 383, 2**31, 10**30])
def test_indices_torch_would_wrap_are_refused(index):
    with pytest.raises(ValueError, match=f"device index must be at most {MAX_CUDA_INDEX} .*got 'cuda:{index}'"):
        check_device(f"cuda:{index}")


def test_as_torch_device_checks_strings_and_passes_devices_through():
    assert as_torch_device("cuda:3") == torch.device("cuda", 3) and as_torch_device("cpu") == torch.device("cpu")
    meta = torch.device("meta")
    assert as_torch_device(meta) is meta  # a torch.device was made by the caller: no string to check
    with pytest.raises(ValueError, match="at most 127"):
        as_torch_device("cuda:256")
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        as_torch_device("auto")
